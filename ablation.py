"""
The zero-init ablation: a grid of short training runs, then report.md, plots and results.json.

    python ablation.py --config configs/ablation/digits.yaml --output_dir outputs/ablation_digits
    python ablation.py --config configs/ablation/digits.yaml --output_dir DIR --processes 2
    python ablation.py --config configs/ablation/digits.yaml --output_dir DIR --init_study   # about a minute
    python ablation.py --output_dir DIR --report_only
    python ablation.py --output_dir DIR --report_only --results docs/ablation/digits_results.json.gz
    python ablation.py --combine DIR1,DIR2 --output_dir DIR

(``python -m unet.ablation ...`` is the same command.) Run it again with the same output_dir
to continue an interrupted grid. Exit status: 0 done, 2 bad command line or grid file, 1 a
data, training or checkpoint error.
"""

# The command line is unet.cli.ablation (installed as `unet-ablation`); this file keeps
# `python ablation.py` working from a checkout.
import sys

from unet.cli.ablation import main

if __name__ == "__main__":
    sys.exit(main())
