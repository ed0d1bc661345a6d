"""Sampling and export: diffusers schedulers and the sampling loop (``sampling.generate``),
classifier-free guidance, export to a diffusers pipeline, and the pipeline shipped beside a
class-conditional export (``hub_pipeline``: torch and diffusers only)."""
