"""The paper: layers (``nn``), init schemes (``init``), the U-Net (``model``), the Gaussian
diffusion (``diffusion``, with ``respace``), timestep samplers (``resample``) and the names of
their options (``choices``). Imports torch and numpy only, nothing else of this package."""
