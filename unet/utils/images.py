"""
Images as the package writes them: [-1, 1] float tensors to uint8, a grid of samples, and a
PNG upscaled so that 8x8 digits are visible. Training's sample grid, ``sample.py`` and the
evaluation all go through these three functions.
"""

import math

import numpy as np
import torch
from einops import rearrange
from PIL import Image

GREY = 128  # 0.0 in [-1, 1]: a gap that shows between digits drawn on black


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] floats in [-1, 1] -> [N, H, W, C] uint8 numpy (rounded, clamped), the
    layout of the original's ``samples.npz``."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: "np.ndarray | torch.Tensor", nrow: int, pad: int = 1, pad_value: int = GREY) -> np.ndarray:
    """
    Lay images out in rows of ``nrow``: one [rows*(H+pad), nrow*(W+pad), C] uint8 array.

    :param images: [N, H, W, C] uint8 numpy, or an [N, C, H, W] float tensor in [-1, 1].
    :param pad: pixels after each cell (right and below).
    :param pad_value: the gap's grey level; missing cells at the end stay black.
    """
    if torch.is_tensor(images):
        images = to_uint8(images)
    n = len(images)
    rows = math.ceil(n / nrow)
    cells = np.zeros((rows * nrow, *images.shape[1:]), dtype=np.uint8)
    cells[:n] = images
    cells = np.pad(cells, ((0, 0), (0, pad), (0, pad), (0, 0)), constant_values=pad_value)
    return rearrange(cells, "(r c) h w ch -> (r h) (c w) ch", r=rows, c=nrow)


def to_pil(array):
    """[H, W] or [H, W, C] uint8 -> PIL image (grey for one channel)."""
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def save_png(array: np.ndarray, path: str, min_size: int = 512) -> None:
    """
    Write an [H, W] or [H, W, C] uint8 image as PNG, upscaled by nearest neighbour by the
    largest whole factor that keeps the long side at most ``min_size`` (never below 1x;
    ``min_size=0`` writes it as is).
    """
    img = to_pil(array)
    scale = max(1, min_size // max(img.size))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
