"""Post-hoc EMA of any length from a run's snapshots: ``python phema.py --checkpoint DIR ...``; see
``--help``. Installed as ``unet-phema``; the command line itself is ``unet/cli/phema.py``."""

import sys

from unet.cli.phema import main

if __name__ == "__main__":
    sys.exit(main())
