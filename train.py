"""Train an improved-DDPM U-Net.

    accelerate launch train.py                                # digits on this machine, offline
    accelerate launch train.py --config configs/cifar10.yaml  # the paper's CIFAR-10 setup
    accelerate launch train.py --resume latest --max_steps 6000

Every config key can be given as --key value (see --help). Exit codes: 0 done, 2 bad
configuration (also a resume that changes a fixed key, or a fresh run into an output_dir
that holds checkpoints), 1 data/checkpoint/setup error, 3 stopped on non-finite or diverging
loss, 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (requeue with --resume auto)."""

# The command line is unet.cli.train (installed as `unet-train`); this file keeps
# `accelerate launch train.py` working from a checkout.
import sys

from unet.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
