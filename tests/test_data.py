"""Data: the embedded digits, image folders with bad files, and the step-indexed order."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import unet.data.dataset as data_mod
from unet.config import TrainConfig
from unet.data.dataset import DataError, batch_indices, fixed_batch, load_image_data, train_loader


def test_digits_are_the_real_sklearn_digits():
    data = load_image_data(TrainConfig(eval_fraction=0.0), log=lambda *a: None)
    assert len(data.train) == 1797 and data.eval is None and data.num_classes == 10 and data.skipped == 0
    x, y = fixed_batch(data.train, 1797)
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1
    ref = load_digits()
    # 17 grey levels mapped to [-1, 1]; 8-bit storage rounds them by at most 0.5/127.5
    np.testing.assert_allclose(x[:, 0].numpy(), ref.images / 8.0 - 1.0, atol=0.004)
    np.testing.assert_array_equal(y.numpy(), ref.target)


def test_digits_held_out_split_is_fixed_and_disjoint():
    a = load_image_data(TrainConfig(seed=1), log=lambda *a: None)
    b = load_image_data(TrainConfig(seed=2), log=lambda *a: None)
    assert (len(a.train), len(a.eval)) == (1617, 180)
    xa, _ = fixed_batch(a.eval, 180)
    xb, _ = fixed_batch(b.eval, 180)
    assert torch.equal(xa, xb)  # the held-out set does not depend on the run's seed
    xt, _ = fixed_batch(a.train, 1617)
    flat_train = {tuple(v) for v in xt.flatten(1).tolist()}
    assert sum(tuple(v) in flat_train for v in xa.flatten(1).tolist()) < 10  # only true duplicates overlap


def test_batch_order_is_independent_of_process_count():
    n, seed, gb = 50, 3, 12
    one = torch.cat([batch_indices(s, m, 0, n, seed, gb, 2, 1) for s in range(10) for m in range(2)])
    two = torch.cat([torch.cat([batch_indices(s, m, r, n, seed, gb, 2, 2) for r in range(2)])
                     for s in range(10) for m in range(2)])
    assert torch.equal(one, two)
    # each epoch visits every example exactly once
    assert sorted(one[:50].tolist()) == list(range(50)) and sorted(one[50:100].tolist()) == list(range(50))
    assert not torch.equal(one[:50], one[50:100])  # and is reshuffled
    other = torch.cat([batch_indices(s, 0, 0, n, seed + 1, gb, 1, 1) for s in range(5)])
    assert not torch.equal(one[:60], other)


def test_loader_resumes_mid_run():
    cfg = TrainConfig(batch_size=8, max_steps=6)
    data = load_image_data(cfg, log=lambda *a: None)
    full = [y for _, y in train_loader(data, cfg, 0, 0, 1, seed=5)]
    resumed = [y for _, y in train_loader(data, cfg, 3, 0, 1, seed=5)]
    assert len(full) == 6 and all(torch.equal(a, b) for a, b in zip(full[3:], resumed))


def _folder(root, counts, size=12):
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_imagefolder_skips_and_counts_corrupt_files(tmp_path):
    _folder(tmp_path, {"cats": 4, "dogs": 3})
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG this is not an image")
    (tmp_path / "cats" / "truncated.png").write_bytes((tmp_path / "cats" / "0.png").read_bytes()[:60])
    logged = []
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, channels=3, num_classes=2,
                      eval_fraction=0.0)
    data = load_image_data(cfg, log=logged.append)
    assert data.skipped == 2 and len(data.train) == 7 and data.num_classes == 2
    assert len(logged) == 1 and "skipped 2 corrupt" in logged[0]
    x, y = fixed_batch(data.train, 7)
    assert x.shape == (7, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert sorted(y.tolist()) == [0, 0, 0, 0, 1, 1, 1]


def _corrupt_folder(root):
    _folder(root, {"cats": 4, "dogs": 3})
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG this is not an image")
    (root / "cats" / "truncated.png").write_bytes((root / "cats" / "0.png").read_bytes()[:60])


@pytest.mark.parametrize("mode", ["lazy", "auto"])
def test_lazy_verification_skips_corrupt_files_when_read_and_keeps_batches_whole(tmp_path, monkeypatch, mode):
    """verify_images lazy (or auto above LAZY_FROM images): no pass before training; a corrupt file
    is logged and counted when first read, and the next readable example takes its place."""
    monkeypatch.setattr(data_mod, "LAZY_FROM", 5)  # auto: lazy from 6 images, so for these 9
    _corrupt_folder(tmp_path)
    logged = []
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, channels=3, num_classes=2,
                      eval_fraction=0.0, verify_images=mode)
    data = load_image_data(cfg, log=logged.append)
    assert len(data.train) == 9 and data.skipped_images() == 0 and logged == []  # nothing read yet
    x, y = fixed_batch(data.train, 9)
    assert x.shape == (9, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert data.skipped_images() == 2 and len(logged) == 2
    assert any("broken.png" in line for line in logged) and "2 skipped so far" in logged[-1]
    # each corrupt index yields its next readable neighbour, the same on every read
    raw = data.train.raw
    for bad in data.train.bad:
        nxt = next(j for j in range(bad + 1, bad + 9) if j % 9 not in data.train.bad) % 9
        assert torch.equal(data.train[bad]["image"], data.train[nxt]["image"])
        assert data.train[bad]["label"] == raw[nxt]["label"]
    assert data.skipped_images() == 2 and len(logged) == 2  # counted once
    # the parallel check drops the same two files up front
    eager = load_image_data(cfg.replace(verify_images="parallel"), log=lambda *a: None)
    assert eager.skipped_images() == 2 and len(eager.train) == 7


def test_a_lazy_split_batches_through_the_step_loader(tmp_path):
    _corrupt_folder(tmp_path)
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, channels=3, num_classes=2,
                      eval_fraction=0.2, verify_images="lazy", batch_size=4, max_steps=5)
    data = load_image_data(cfg, log=lambda *a: None)
    assert len(data.train) + len(data.eval) == 9
    batches = [x for x, _ in train_loader(data, cfg, 0, 0, 1, seed=0)]
    assert [b.shape for b in batches] == [(4, 3, 8, 8)] * 5
    again = [x for x, _ in train_loader(data, cfg, 2, 0, 1, seed=0)]  # resume at step 2
    assert all(torch.equal(a, b) for a, b in zip(batches[2:], again))


def test_missing_empty_and_mismatched_data_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_data(TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no image files"):
        load_image_data(TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "empty")))
    _folder(tmp_path / "three", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(DataError, match="'num_classes' is 10 but .* has 3 classes"):
        load_image_data(TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "three")), log=lambda *a: None)


def test_decompression_bombs_and_decoder_eof_errors_are_skipped_and_counted(tmp_path, monkeypatch):
    """issue 12 item 9: PIL refuses an image with more pixels than its limit before decoding it
    (DecompressionBombError, not an OSError); some decoders end a truncated file with EOFError."""
    _folder(tmp_path, {"a": 3, "b": 2})
    Image.new("RGB", (64, 64)).save(tmp_path / "a" / "bomb.png")  # 4096 pixels: a bomb under the limit below
    Image.new("RGB", (12, 12)).save(tmp_path / "b" / "eof.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above twice the limit
    real_load = Image.Image.load

    def load(self):
        if str(getattr(self, "filename", "")).endswith("eof.png"):
            raise EOFError("no more image data")
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", load)
    logged = []
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, channels=3, num_classes=2,
                      eval_fraction=0.0)
    data = load_image_data(cfg, log=logged.append)
    assert data.skipped == 2 and len(data.train) == 5 and "skipped 2 corrupt" in logged[0]
    assert fixed_batch(data.train, 5)[0].shape == (5, 3, 8, 8)


def test_a_folder_with_one_usable_image_trains_without_a_held_out_split(tmp_path):
    _folder(tmp_path, {"a": 1})
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    logged = []
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, channels=3, class_cond=False)
    data = load_image_data(cfg, log=logged.append)
    assert len(data.train) == 1 and data.eval is None and data.skipped == 1
    assert any("too few to hold 0.1 out" in line for line in logged)
    x, _ = next(iter(train_loader(data, cfg.replace(batch_size=4, max_steps=1), 0, 0, 1, seed=0)))
    assert x.shape == (4, 3, 8, 8)  # the one image, four times


def test_a_held_out_split_with_no_readable_image_is_a_one_line_error(tmp_path):
    _folder(tmp_path / "train", {"a": 2})
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a" / "broken.png").write_bytes(b"not an image")
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, channels=3, num_classes=1)
    with pytest.raises(DataError, match="^the held-out split of dataset 'imagefolder' has no readable images$"):
        load_image_data(cfg, log=lambda *a: None)
