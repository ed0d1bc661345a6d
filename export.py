"""Export a checkpoint as a diffusers pipeline: ``python export.py CHECKPOINT OUT``; see ``--help``.
Installed as ``unet-export``; the command line itself is ``unet/cli/export.py``."""

import sys

from unet.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
