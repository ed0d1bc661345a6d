"""``python -m unet.evaluate``: the same command as ``evaluate.py`` and ``unet-evaluate``."""

import sys

from unet.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
