"""``python -m unet.ablation``: the same command as ``ablation.py`` and ``unet-ablation``."""

import sys

from unet.cli.ablation import main

if __name__ == "__main__":
    sys.exit(main())
