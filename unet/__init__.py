"""unet: the improved-DDPM U-Net and Gaussian diffusion, with the init ablation."""

__version__ = "0.3.0"
