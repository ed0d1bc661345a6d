"""Evaluation: held-out loss and bits/dim (``held_out``), the digit judge (``judge``), the
samplers' quality and speed (``samplers``), FID (``fid``), and what a config's samples are
measured against with the figures training and ``evaluate.py`` report (``quality``)."""
