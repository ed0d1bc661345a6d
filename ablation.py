"""The zero-init ablation grid and its report: ``python ablation.py --config FILE --output_dir DIR``;
see ``--help``. Installed as ``unet-ablation``; the command line itself is ``unet/cli/ablation.py``."""

import sys

from unet.cli.ablation import main

if __name__ == "__main__":
    sys.exit(main())
