"""Sample images from a trained model: see ``python sample.py --help`` and docs/sampling.md.

    python sample.py --checkpoint outputs/digits --num_samples 64 --scheduler dpm-solver++ --steps 20 --out samples
    python sample.py --checkpoint outputs/digits-cfg --class_labels 7 --guidance_scale 2 --out sevens
    accelerate launch --multi_gpu --num_processes 2 sample.py ...   # each process samples its share

Writes ``grid.png``, ``samples.npz`` and, with ``--png``, ``images/NNNNNN.png``. The
sampling itself is ``unet.sample.sampling.generate``; this file is the command line and the files.
Bad input is one line on stderr and exit status 2, found before any sampling starts.
"""

# The command line is unet.cli.sample (installed as `unet-sample`); this file keeps
# `python sample.py` working from a checkout.
import sys

from unet.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
