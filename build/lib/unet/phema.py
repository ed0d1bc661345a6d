"""``python -m unet.phema``: the same command as ``phema.py`` and ``unet-phema``."""

import sys

from unet.cli.phema import main

if __name__ == "__main__":
    sys.exit(main())
