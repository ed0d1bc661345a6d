"""The IDX reader (MNIST's file format) on files the tests write by hand: shapes, dtypes and
values, gzip or plain, and one-line errors naming the file for every way a file can be bad."""

import gzip
import struct

import numpy as np
import pytest

from unet.utils.idx import IdxError, find_idx_files, read_idx, write_idx


def _hand_made(path, magic, dims, payload, compress=False):
    """An IDX file written byte by byte (not through ``write_idx``): magic, big-endian dims, payload."""
    data = bytes(magic) + b"".join(struct.pack(">I", d) for d in dims) + payload
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.mark.parametrize("compress", [False, True])
def test_reads_hand_made_images_and_labels(tmp_path, compress):
    pixels = bytes(range(24))  # 2 images of 3x4, values 0..23 in C order
    ext = ".gz" if compress else ""
    images = read_idx(_hand_made(tmp_path / f"img{ext}", [0, 0, 0x08, 3], [2, 3, 4], pixels, compress))
    labels = read_idx(_hand_made(tmp_path / f"lab{ext}", [0, 0, 0x08, 1], [2], bytes([7, 3]), compress))
    assert images.dtype == np.uint8 and images.shape == (2, 3, 4)
    assert images[1, 0, 0] == 12 and images[0, 2, 3] == 11  # row-major, as the format says
    assert labels.tolist() == [7, 3]


@pytest.mark.parametrize("code, dtype, values", [(0x0B, ">i2", [-2, 300]), (0x0C, ">i4", [-70000, 5]),
                                                 (0x0D, ">f4", [1.5, -0.25]), (0x0E, ">f8", [1e-300, 2.0]),
                                                 (0x09, ">i1", [-5, 7])])
def test_every_type_code(tmp_path, code, dtype, values):
    path = _hand_made(tmp_path / "x", [0, 0, code, 1], [2], np.asarray(values, dtype).tobytes())
    out = read_idx(path)
    assert out.dtype.isnative and out.tolist() == values


def test_write_idx_round_trips(tmp_path):
    a = np.arange(60, dtype=np.uint8).reshape(5, 3, 4)
    write_idx(str(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.gz")), a)


@pytest.mark.parametrize("case, expect", [
    ("magic", "not an IDX file"),
    ("type", "unknown IDX type code 0x07"),
    ("header", "truncated header"),
    ("short", "truncated"),
    ("long", "trailing bytes"),
    ("gzip", "cannot be read"),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path, case, expect):
    good = dict(magic=[0, 0, 0x08, 3], dims=[2, 3, 4], payload=bytes(24))
    bad = {"magic": dict(good, magic=[0x1F, 0x8B, 0x08, 3]), "type": dict(good, magic=[0, 0, 0x07, 3]),
           "short": dict(good, payload=bytes(23)), "long": dict(good, payload=bytes(25)),
           "header": dict(good, dims=[2], payload=b"")}.get(case, good)
    path = _hand_made(tmp_path / "bad", bad["magic"], bad["dims"], bad["payload"])
    if case == "gzip":  # plain bytes under a .gz name: gzip's own error
        (tmp_path / "bad.gz").write_bytes((tmp_path / "bad").read_bytes())
        path = str(tmp_path / "bad.gz")
    with pytest.raises(IdxError) as e:
        read_idx(path)
    msg = str(e.value)
    assert expect in msg and path in msg and "\n" not in msg


def test_truncated_gzip_is_one_line(tmp_path):
    write_idx(str(tmp_path / "a.gz"), np.zeros((100, 28, 28), np.uint8) + 3)
    raw = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "a.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IdxError, match="cannot be read"):
        read_idx(str(tmp_path / "a.gz"))


def test_finds_the_mnist_names(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels.idx1-ubyte", "t10k-images-idx3-ubyte", "other.gz"):
        (tmp_path / name).write_bytes(b"")
    found = find_idx_files(str(tmp_path))
    assert set(found) == {("train", "images"), ("train", "labels"), ("test", "images")}
    assert found["train", "labels"].endswith("train-labels.idx1-ubyte")
