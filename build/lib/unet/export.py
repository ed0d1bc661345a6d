"""``python -m unet.export``: the same command as ``export.py`` and ``unet-export``."""

import sys

from unet.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
