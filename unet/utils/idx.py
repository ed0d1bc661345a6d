"""The IDX file format of MNIST and its family (Fashion-MNIST, KMNIST, EMNIST): a 4-byte magic
number (two zero bytes, a type code, the number of dimensions), one big-endian uint32 per
dimension, then the values in C order. Files may be gzip-compressed. Nothing here imports torch."""

import gzip
import os

import numpy as np

# The type code (third byte of the magic number) -> big-endian numpy dtype.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxError(ValueError):
    """A file that is not a readable IDX file; its message names the file."""


def _raw_bytes(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError when cut short
        raise IdxError(f"'{path}': cannot be read ({type(e).__name__}: {e})") from None


def parse_idx(data, name="<bytes>"):
    """
    An IDX file's contents as a numpy array (native byte order).

    :param data: the file's bytes (already decompressed).
    :param name: what the error messages call the file.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxError(f"'{name}': not an IDX file (magic number {data[:4].hex() or 'missing'}, expected 0000TTNN)")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        raise IdxError(f"'{name}': unknown IDX type code 0x{code:02x} (known: "
                       f"{', '.join(f'0x{c:02x}' for c in IDX_TYPES)})")
    if ndim < 1:
        raise IdxError(f"'{name}': an IDX file needs at least one dimension, the header says {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"'{name}': truncated header ({len(data)} bytes, {header} needed for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dtype = np.dtype(IDX_TYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise IdxError(f"'{name}': {'truncated' if len(data) < expected else 'trailing bytes'}: the header says "
                       f"shape {shape} ({expected} bytes), the file has {len(data)}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
    """The array in an IDX file (``.gz`` or plain); a bad file is one ``IdxError`` naming it."""
    return parse_idx(_raw_bytes(path), path)


def write_idx(path, array):
    """``array`` as an IDX file (gzip-compressed when ``path`` ends in .gz): for tests and for
    users converting their own images."""
    array = np.asarray(array)
    code = next((c for c, t in IDX_TYPES.items() if np.dtype(t).newbyteorder("=") == array.dtype), None)
    if code is None:
        raise IdxError(f"'{path}': IDX cannot store dtype {array.dtype}")
    data = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
            + array.astype(IDX_TYPES[code]).tobytes())
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


# --- the MNIST family's file names -----------------------------------------------------------

# (split, images or labels) -> the names' stems; each is looked for as .gz, plain, and with the
# "-idx3-ubyte" -> ".idx3-ubyte" spelling some mirrors use.
STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def find_idx_files(folder: str) -> dict[tuple[str, str], str]:
    """{(split, kind): path} of the MNIST-layout files in ``folder`` (missing ones left out)."""
    found = {}
    for key, stem in STEMS.items():
        for name in (stem, stem.replace("-idx", ".idx")):
            for ext in (".gz", ""):
                path = os.path.join(folder, name + ext)
                if os.path.isfile(path) and key not in found:
                    found[key] = path
    return found
