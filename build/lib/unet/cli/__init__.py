"""The command lines, the top layer: ``train``, ``sample``, ``evaluate``, ``export``, ``phema`` and
``ablation``, each a ``main(argv=None) -> int``. They are installed as ``unet-train``, ``unet-sample``,
... (``pyproject.toml``), and ``train.py`` and the other files at the repository root call them.
Nothing in the library imports them."""
