"""
Evaluate a trained model or its samples: bits/dim and the training loss on held-out data,
digit quality, FID for RGB data, and the samplers' quality and speed.

    python evaluate.py bpd --checkpoint outputs/digits
    python evaluate.py loss --checkpoint outputs/run_a --checkpoint outputs/run_b   # paired by draw
    python evaluate.py quality --samples samples/samples.npz
    python evaluate.py ref --data configs/digits.yaml --out digits_ref.npz           # reference statistics, once
    python evaluate.py fid --checkpoint outputs/digits --ref digits_ref.npz --num_samples 2000
    accelerate launch evaluate.py fid --checkpoint outputs/cifar10 --ref cifar10_ref.npz --num_samples 50000
    python evaluate.py fid --samples samples/samples.npz --ref path/to/real/images
    python evaluate.py benchmark --checkpoint outputs/digits --num_samples 200
    python evaluate.py benchmark --checkpoint outputs/digits-cfg --runs ddpm:100 --guidance 0,1,2,3 --seeds 4 \
        --json rows.json
    python evaluate.py summary --rows rows.json

(``python -m unet.evaluate ...`` is the same command.) Bad input is one line on stderr and
exit status 2.
"""

# The command line is unet.cli.evaluate (installed as `unet-evaluate`); this file keeps
# `python evaluate.py` working from a checkout.
import sys

from unet.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
