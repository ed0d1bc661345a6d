"""The image helpers: exact uint8 conversion, grid layout (gaps, missing cells) and PNG size."""

import numpy as np
import torch
from PIL import Image

from unet.utils.images import image_grid, save_png, to_uint8


def test_to_uint8_rounds_clamps_and_moves_channels_last():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0 / 127.5 - 1, 1.0, 3.0]).reshape(1, 1, 2, 3)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 3, 1)
    assert u.ravel().tolist() == [0, 0, 128, 1, 255, 255]  # 127.5 rounds half to even: 128


def test_grid_places_cells_with_grey_gaps_and_black_missing_cells():
    images = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(3)])
    grid = image_grid(images, nrow=2)
    assert grid.shape == (2 * 3, 2 * 4, 1)
    assert (grid[0:2, 0:3] == 10).all() and (grid[0:2, 4:7] == 20).all() and (grid[3:5, 0:3] == 30).all()
    assert (grid[3:5, 4:7] == 0).all()  # the fourth cell is missing
    assert (grid[2, :] == 128).all() and (grid[:, 3] == 128).all()  # 1 px grey gaps after each cell
    assert (image_grid(images, 2, pad=2, pad_value=0)[2:4] == 0).all()


def test_grid_of_a_float_tensor_equals_grid_of_its_uint8():
    x = torch.rand(5, 3, 4, 4) * 2 - 1
    assert np.array_equal(image_grid(x, 3), image_grid(to_uint8(x), 3))


def test_save_png_upscales_by_a_whole_factor(tmp_path):
    img = np.arange(8 * 6, dtype=np.uint8).reshape(6, 8)
    save_png(img, tmp_path / "a.png", min_size=50)  # 50 // 8 = 6
    save_png(img[..., None], tmp_path / "b.png", min_size=0)
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == (48, 36) and b.size == (8, 6) and b.mode == "L"
        assert np.array_equal(np.asarray(a)[::6, ::6], img) and np.array_equal(np.asarray(b), img)
