"""The MNIST family as a data source: Fashion-MNIST (``dataset: fashion_mnist``) and any folder of
MNIST-layout IDX files (``dataset: idx``: MNIST, KMNIST, EMNIST...).

The files are read once into memory (70,000 28x28 images are 55 MB as uint8), with the official
train/test split kept: the test split is the held-out split. Fashion-MNIST is looked for in
``data_dir``, else in Debian's ``dataset-fashion-mnist`` folder; with neither it comes from the
hub dataset through ``datasets``. 28x28 trains as is; 32 pads 2 black pixels on each side; 14
averages 2x2 blocks (exact: no interpolation)."""

import functools
import os

import numpy as np
import torch

from unet.utils.idx import IdxError, find_idx_files, read_idx

from .splits import DataError, ImageData

MNIST_FAMILY = ("fashion_mnist", "idx")
# Debian's dataset-fashion-mnist puts the four original files here.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
NATIVE_SIZE = 28
SIZES = {28: "as is", 32: "zero-padded to 32x32 (2 black pixels on each side)",
         14: "2x2 average-pooled to 14x14"}


def size_rule(native, size):
    """How ``native``-pixel images become ``size`` pixels: as is, padded to 32 or pooled to 14
    (MNIST-family sizes); anything else is a one-line ``DataError``."""
    if native == NATIVE_SIZE and size in SIZES:
        return SIZES[size]
    if size == native:
        return "as is"
    raise DataError(f"config key 'image_size': got {size}; the images are {native}x{native}: use {native}"
                    + (", 32 (zero-padded) or 14 (2x2 average-pooled)" if native == NATIVE_SIZE else ""))


def to_model_images(images, size):
    """[N, H, W] uint8 -> [N, 1, size, size] float32 in [-1, 1] by ``size_rule``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0).unsqueeze(1)
    native = x.shape[-1]
    size_rule(native, size)
    if size == native:
        return x
    if size > native:  # black (-1) borders: the background of every MNIST-family image
        pad = (size - native) // 2
        return torch.nn.functional.pad(x, (pad, size - native - pad) * 2, value=-1.0)
    return torch.nn.functional.avg_pool2d(x, 2)  # the mean of each 2x2 block, exact


class ArrayImages(torch.utils.data.Dataset):
    """A split held in memory: rows {"image": [1, S, S] in [-1, 1], "label": int}."""

    def __init__(self, images, labels):
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.long)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": int(self.labels[index])}


def _folder(cfg):
    """The folder to read (``data_dir``, else Debian's for fashion_mnist), or None."""
    if cfg.data_dir:
        return cfg.data_dir
    return next((d for d in FASHION_MNIST_DIRS if find_idx_files(d)), None) if cfg.dataset == "fashion_mnist" \
        else None


@functools.lru_cache(maxsize=2)
def _read_folder(folder, stamp):
    """{split: (images, labels)} of a folder's IDX files, checked; ``stamp`` (sizes and times)
    keys the cache so that a changed file is read again."""
    files = find_idx_files(folder)
    if ("train", "images") not in files or ("train", "labels") not in files:
        raise DataError(f"data_dir '{folder}' holds no MNIST-layout IDX files (train-images-idx3-ubyte[.gz] and "
                        "train-labels-idx1-ubyte[.gz], optionally t10k-*)")
    out = {}
    for split in ("train", "test"):
        if (split, "images") not in files:
            continue
        try:
            images, labels = read_idx(files[split, "images"]), read_idx(files[split, "labels"])
        except KeyError:
            raise DataError(f"data_dir '{folder}': {split} images without their labels file") from None
        except IdxError as e:
            raise DataError(str(e)) from None
        if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
            raise DataError(f"'{files[split, 'images']}': expected N square uint8 images, got {images.dtype} "
                            f"of shape {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"'{files[split, 'labels']}': {labels.shape[0] if labels.ndim else 0} labels for "
                            f"{len(images)} images in '{files[split, 'images']}'")
        out[split] = (images, labels.astype(np.int64))
    return out


def _from_hub(cfg):
    """Fashion-MNIST through ``datasets`` from the hub (no local copy); offline, one line."""
    import datasets

    try:
        ds = datasets.load_dataset(FASHION_MNIST_HUB, cache_dir=cfg.cache_dir or None)
    except Exception as e:  # offline, no access: what to do instead, in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"dataset 'fashion_mnist': no local copy (looked in {', '.join(FASHION_MNIST_DIRS)}) and "
                        f"the hub dataset '{FASHION_MNIST_HUB}' could not be loaded ({first}); install it with "
                        "'apt-get install dataset-fashion-mnist' or put the four IDX files in a folder and set "
                        "data_dir") from None
    return {split: (np.stack([np.asarray(im.convert("L")) for im in ds[split]["image"]]),
                    np.asarray(ds[split]["label"], dtype=np.int64)) for split in ("train", "test") if split in ds}


def read_arrays(cfg):
    """({split: (uint8 images [N, 28, 28], labels)}, where they came from)."""
    folder = _folder(cfg)
    if folder is None and cfg.dataset == "fashion_mnist":
        return _from_hub(cfg), f"the hub dataset '{FASHION_MNIST_HUB}'"
    if not os.path.isdir(folder):
        raise DataError(f"data_dir '{folder}' does not exist or is not a folder")
    files = find_idx_files(folder)
    stamp = tuple(sorted((p, os.path.getsize(p), os.path.getmtime(p)) for p in files.values()))
    return _read_folder(os.path.abspath(folder), stamp), f"'{folder}' (IDX)"


def load_mnist_family(cfg, log=print):
    """The train and held-out (official test) splits of cfg's MNIST-family data as an ``ImageData``
    at ``cfg.image_size``; without a test split, ``eval_fraction`` of train is held out (seed 0)."""
    arrays, source = read_arrays(cfg)
    train_x, train_y = arrays["train"]
    rule = size_rule(train_x.shape[1], cfg.image_size)
    if "test" in arrays:
        held_x, held_y = arrays["test"]
        how = "its test split held out"
    elif cfg.eval_fraction > 0:
        order = np.random.default_rng(0).permutation(len(train_x))
        cut = len(train_x) - max(1, int(round(cfg.eval_fraction * len(train_x))))
        (train_x, train_y), (held_x, held_y) = ((train_x[order[:cut]], train_y[order[:cut]]),
                                                (train_x[order[cut:]], train_y[order[cut:]]))
        how = f"no test split: {cfg.eval_fraction:g} of train held out"
    else:
        held_x = held_y = None
        how = "no held-out split"
    num_classes = int(max(train_y.max(), -1 if held_y is None else held_y.max())) + 1
    if cfg.class_cond and num_classes != cfg.num_classes:
        raise DataError(f"config key 'num_classes' is {cfg.num_classes} but dataset '{cfg.dataset}' "
                        f"has {num_classes} classes")
    log(f"dataset '{cfg.dataset}': {len(train_x)} train and {0 if held_x is None else len(held_x)} held-out images "
        f"of {train_x.shape[1]}x{train_x.shape[2]} from {source}, {how}; {rule}")
    held = None if held_x is None else ArrayImages(to_model_images(held_x, cfg.image_size), held_y)
    return ImageData(ArrayImages(to_model_images(train_x, cfg.image_size), train_y), held, num_classes, 0)
