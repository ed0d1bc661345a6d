"""Sample images from a trained model: ``python sample.py --checkpoint DIR --out DIR``; see ``--help``.
Installed as ``unet-sample``; the command line itself is ``unet/cli/sample.py``."""

import sys

from unet.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
