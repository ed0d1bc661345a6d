"""Post-hoc EMA (EDM2): the EMA of any length from the snapshots a run stored with
``--phema_every N``, written as a checkpoint that sample.py, evaluate.py and export.py read.

    python phema.py --checkpoint outputs/digits --sigma_rel 0.08 --out outputs/digits-phema
    python phema.py --checkpoint outputs/digits --sweep 0.05,0.0625,0.075,0.0875,0.1 --out outputs/digits-best

(``python -m unet.phema ...`` is the same command.) ``--sweep`` reconstructs each length,
samples it and scores the samples with the digit judge's Frechet distance (the metric of
``evaluate.py benchmark``), and writes the best. Bad input is one line on stderr and exit 2.
"""

# The command line is unet.cli.phema (installed as `unet-phema`); this file keeps
# `python phema.py` working from a checkout.
import sys

from unet.cli.phema import main

if __name__ == "__main__":
    sys.exit(main())
