"""Export a checkpoint as a diffusers pipeline that runs without this package.

    python export.py outputs/digits exported/digits
    python export.py outputs/digits exported/digits --quality rows.json   # measured quality in the card
    python export.py outputs/digits exported/digits --push_to_hub --hub_model_id USER/NAME [--private]

(``python -m unet.export ...`` is the same command.) The conversion is
``unet.sample.export.export_pipeline``; bad input is one line on stderr and exit status 2.
A push that fails (no token, no network) is one line and exit status 1, after the local
folder is written.
"""

# The command line is unet.cli.export (installed as `unet-export`); this file keeps
# `python export.py` working from a checkout.
import sys

from unet.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
