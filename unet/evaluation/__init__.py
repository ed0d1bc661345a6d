"""Evaluation: held-out loss and bits/dim (``held_out``), the digit judge (``judge``), the
samplers' quality and speed (``samplers``) and FID (``fid``)."""
