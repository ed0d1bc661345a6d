"""Train an improved-DDPM U-Net: ``accelerate launch train.py [--config FILE] [--key value ...]``;
``--help`` lists every key. Installed as ``unet-train``; the command line itself is ``unet/cli/train.py``."""

import sys

from unet.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
