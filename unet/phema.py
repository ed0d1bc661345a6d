"""``python -m unet.phema ...`` runs ``phema.py`` at the repository root (the command line
lives outside the library; this alias only keeps the short form working)."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[1] / "phema.py"), run_name="__main__")
