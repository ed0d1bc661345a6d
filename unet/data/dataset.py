"""Images through Hugging Face ``datasets``: scikit-learn's bundled handwritten digits (the
default; nothing to download), a local folder of images (``imagefolder``), or a hub dataset;
the MNIST family (Fashion-MNIST, IDX folders) through ``unet.data.mnist``.

The order in which training sees examples is a pure function of (data seed, step), not of
an iterator's state: resuming at step s replays exactly the batches a straight run would
have seen, and every init arm of the ablation sees the same data for the same seed."""

import glob
import io
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from unet.config import ConfigError, TrainConfig, check_batch_split
from unet.core.diffusion import GaussianDiffusion
from unet.core.resample import ScheduleSampler
from unet.utils.devices import cpu_cores
from unet.utils.images import to_uint8

from .mnist import MNIST_FAMILY, load_mnist_family
from .splits import DataError, ImageData  # noqa: F401 (re-exported: callers catch dataset.DataError)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class LazyImages(torch.utils.data.Dataset):
    """
    A split read with ``verify_images: lazy``: no pass over the files before training; a file that
    does not decode is skipped when it is first read, logged and counted, and the next readable
    example (in index order) takes its place. A batch keeps its size and stays a pure function
    of (data seed, step), so resume is as exact as with the up-front check; the count lives in
    the process (or DataLoader worker) that decoded the file.

    :param raw: a ``datasets.Dataset`` whose image column is stored undecoded.
    """

    def __init__(self, raw, image_col, label_col, cfg, log):
        self.raw, self.image_col, self.label_col, self.cfg, self.log = raw, image_col, label_col, cfg, log
        self.bad = set()

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, index):
        n = len(self.raw)
        for j in ((index + k) % n for k in range(n)):
            if j in self.bad:
                continue
            row = self.raw[j]
            try:
                image = decode_image(row[self.image_col], self.cfg)
            except DECODE_ERRORS as e:
                self.bad.add(j)
                self.log(f"skipped corrupt image {_name(row[self.image_col], j)} ({type(e).__name__}); "
                         f"{len(self.bad)} skipped so far")
                continue
            return {"image": image, "label": row[self.label_col] if self.label_col else 0}
        raise DataError(f"dataset '{self.cfg.dataset}' has no readable images")


def _name(value, index):
    path = value.get("path") if isinstance(value, dict) else None
    return f"'{path}'" if path else f"at index {index}"


def verify_mode(cfg, count):
    """``verify_images`` resolved for a split of ``count`` images: auto is parallel up to
    ``LAZY_FROM`` images, lazy above."""
    if cfg.verify_images != "auto":
        return cfg.verify_images
    return "parallel" if count <= LAZY_FROM else "lazy"


def digits_dataset():
    """scikit-learn's copy of the UCI handwritten digits (1,797 8x8 images, 17 grey levels,
    10 classes) as a ``datasets.Dataset`` of greyscale PIL images."""
    import datasets
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(p, mode="L") for p in pixels],
                                       "label": d.target.tolist()}, features=features)


def center_crop_resize(img, size):
    """Resize the shorter side to ``size`` and crop the centre square (as improved-diffusion
    does, with a box filter first for large reductions to avoid aliasing)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    return ImageOps.fit(img, (size, size), method=Image.BICUBIC)


# PIL's integer modes wider than 8 bits, by their range: 16-bit PNGs and TIFFs open as I;16*
# (or as I, 32-bit, holding 16-bit values); convert("L") would clip them at 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_tensor(img: Image.Image, size: int, channels: int) -> torch.Tensor:
    """A PIL image -> [C, size, size] float32 in [-1, 1]; 16-bit greyscale scaled by its range
    (0..65535), a float or 32-bit image (no fixed range) refused with a ``ValueError``, which
    the callers skip and count like an undecodable file."""
    if img.mode == "F" or (img.mode == "I" and np.asarray(img).max(initial=0) > 65535) or img.mode == "I;32":
        raise ValueError(f"image mode {img.mode} (float or 32-bit values) has no fixed range to scale to [-1, 1]; "
                         "convert it to 8- or 16-bit")
    if img.mode in SIXTEEN_BIT_MODES:
        grey = Image.fromarray(np.asarray(img, dtype=np.float32) / 65535.0, mode="F")
        arr = np.asarray(center_crop_resize(grey, size), dtype=np.float32).clip(0, 1) * 2.0 - 1.0
        arr = np.repeat(arr.reshape(size, size, 1), channels, axis=2)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    img = center_crop_resize(img.convert("L" if channels == 1 else "RGB"), size)
    arr = np.asarray(img, dtype=np.float32).reshape(size, size, channels) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _open(value):
    """Open an image column value stored undecoded ({"bytes", "path"} or a PIL image)."""
    if isinstance(value, Image.Image):
        return value
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def decode_image(value, cfg):
    """An image column value -> [C, cfg.image_size, cfg.image_size] in [-1, 1]; a file that does
    not decode raises one of ``DECODE_ERRORS`` (each caller decides what skipping means)."""
    return to_tensor(_open(value), cfg.image_size, cfg.channels)


# What a file that does not decode raises: UnidentifiedImageError (an OSError) for what is no
# image, EOFError from some decoders on a truncated file, DecompressionBombError for more
# pixels than PIL's limit (Image.MAX_IMAGE_PIXELS), refused before it is decoded into memory.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

# verify_images auto: an up-front pass below this many images, lazy skipping above it.
LAZY_FROM = 100_000


def _decodes(example, column):
    try:
        _open(example[column]).load()
        return True
    except DECODE_ERRORS:
        return False


def columns(features, cfg):
    """(image column, label column or None): the ones cfg names (``image_column``,
    ``label_column``), else the first image and ClassLabel features; a named column that does
    not exist is a one-line ``DataError``."""
    import datasets

    features = features or {}
    names = list(features)
    for key in ("image_column", "label_column"):
        if getattr(cfg, key) and getattr(cfg, key) not in names:
            raise DataError(f"config key '{key}': the dataset has no column '{getattr(cfg, key)}' "
                            f"(columns: {', '.join(names)})")
    image = cfg.image_column or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    if image is None:
        raise DataError(f"the dataset has no image column (columns: {', '.join(names)}); set --image_column")
    label = cfg.label_column or next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    return image, label


def webdataset_files(data_dir):
    """The tar shards ``data_dir`` names: a folder's ``*.tar`` files or a glob pattern's matches,
    sorted; none is a one-line ``ConfigError`` (exit 2), checked before any work."""
    pattern = os.path.join(data_dir, "*.tar") if os.path.isdir(data_dir) else data_dir
    files = sorted(glob.glob(pattern))
    if not files:
        raise ConfigError(f"config key 'data_dir': the webdataset pattern '{pattern}' matches no shard")
    return files


def load_args(cfg):
    """``datasets.load_dataset`` arguments for cfg's source (not digits): the loader (a hub name,
    imagefolder, parquet, webdataset...), its files, configuration name, cache folder and whether
    it streams (webdataset shards always do)."""
    args = dict(streaming=cfg.streaming or cfg.dataset == "webdataset", cache_dir=cfg.cache_dir or None)
    if cfg.dataset == "webdataset":
        return dict(path="webdataset", data_files={"train": webdataset_files(cfg.data_dir)}, **args)
    if cfg.dataset_config:
        args["name"] = cfg.dataset_config
    return dict(path=cfg.dataset, data_dir=cfg.data_dir or None, **args)


def verify(part, image_col, cfg, mode):
    """The images of ``part`` that decode, checked up front in ``num_proc`` processes
    (``mode`` parallel), or all of them, stored undecoded (off: a corrupt file fails when read;
    lazy: ``LazyImages`` skips it then).

    :param mode: ``verify_mode`` of the dataset, resolved once for all its splits."""
    import datasets

    part = part.cast_column(image_col, datasets.Image(decode=False))
    if mode != "parallel":
        return part
    procs = (cfg.num_proc or cpu_cores()) if len(part) >= 1000 else None  # workers cost more than small sets
    return part.filter(_decodes, fn_kwargs={"column": image_col}, num_proc=procs, desc="checking image files")


def _load_raw(cfg):
    """A ``DatasetDict`` for cfg.dataset: "digits", "imagefolder" (cfg.data_dir) or a hub name."""
    import datasets

    if cfg.dataset == "digits":
        return datasets.DatasetDict(train=digits_dataset())
    if cfg.dataset == "imagefolder":
        if not os.path.isdir(cfg.data_dir):
            raise DataError(f"data_dir '{cfg.data_dir}' does not exist or is not a folder")
        if not any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, fs in os.walk(cfg.data_dir) for f in fs):
            raise DataError(f"data_dir '{cfg.data_dir}' contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
    loader = load_args(cfg)
    try:
        ds = datasets.load_dataset(**loader)
    except Exception as e:  # offline, unknown name, unreadable folder: one line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"dataset '{cfg.dataset}' could not be loaded: {msg}") from None
    if isinstance(ds, datasets.IterableDataset):
        ds = datasets.IterableDatasetDict(train=ds)
    elif not isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = datasets.DatasetDict(train=ds)
    return ds


def load_image_data(cfg: TrainConfig, log: Callable[[str], object] = print) -> ImageData:
    """
    The train and held-out splits of cfg.dataset, decoded and resized on access.

    :param cfg: a ``TrainConfig`` (dataset, data_dir, image_size, channels, class_cond,
        num_classes, eval_fraction).
    :param log: where to report skipped files.
    :return: an ``ImageData``.
    """
    if cfg.dataset in MNIST_FAMILY:  # read into memory by its own reader
        return load_mnist_family(cfg, log)
    raw = _load_raw(cfg)
    split = "train" if "train" in raw else next(iter(raw))
    ds = raw[split]
    image_col, label_col = columns(ds.features, cfg)
    held = next((raw[s] for s in ("test", "validation") if s in raw and s != split), None)
    splits = {"train": ds} if held is None else {"train": ds, "eval": held}

    # Corrupt files are listed like good ones and fail only when decoded: find them once,
    # up front, so that every step's batch has the same size and the count can be reported.
    skipped, mode = 0, verify_mode(cfg, len(ds))
    for name, part in (splits.items() if cfg.dataset != "digits" else ()):  # digits are built in memory
        good = verify(part, image_col, cfg, mode)
        skipped += len(part) - len(good)
        splits[name] = good
    if skipped:
        log(f"skipped {skipped} corrupt image file(s) in dataset '{cfg.dataset}'")
    if len(splits["train"]) == 0:
        raise DataError(f"dataset '{cfg.dataset}' has no readable images")
    if "eval" in splits and len(splits["eval"]) == 0:
        raise DataError(f"the held-out split of dataset '{cfg.dataset}' has no readable images")

    if cfg.class_cond and not label_col:
        raise DataError(f"class_cond is true but dataset '{cfg.dataset}' has no class labels; set --class_cond false")
    num_classes = label_classes(splits, label_col, cfg)
    if cfg.class_cond and num_classes != cfg.num_classes:
        raise DataError(f"config key 'num_classes' is {cfg.num_classes} but dataset '{cfg.dataset}' "
                        f"has {num_classes} classes")
    if "eval" not in splits and cfg.eval_fraction > 0:
        n = len(splits["train"])
        if math.floor((1 - cfg.eval_fraction) * n) < 1 or n < 2:  # datasets' own split sizes
            log(f"dataset '{cfg.dataset}' has {len(splits['train'])} image(s): too few to hold "
                f"{cfg.eval_fraction:g} out; the eval loss is measured on training images")
        else:  # a fixed split seed: the held-out set does not change with the run's seed
            parts = splits["train"].train_test_split(test_size=cfg.eval_fraction, seed=0)
            splits = {"train": parts["train"], "eval": parts["test"]}

    lazy = cfg.dataset != "digits" and mode == "lazy"
    decoded = {k: _decoded(v, image_col, label_col, cfg, lazy, log) for k, v in splits.items()}
    return ImageData(decoded["train"], decoded.get("eval"), num_classes, skipped)


def label_classes(splits: dict, label_col: "str | None", cfg: TrainConfig) -> int:
    """The classes of the label column: a ``ClassLabel``'s count; for a plain integer column of a
    class-conditional run, ``num_classes``, once every label of every split lies in [0, num_classes)
    (as a stream's labels are read); 0 without labels."""
    if not label_col:
        return 0
    feature = splits["train"].features[label_col]
    if hasattr(feature, "num_classes"):
        return feature.num_classes
    if not cfg.class_cond:
        return 0
    dtype = str(getattr(feature, "dtype", type(feature).__name__))
    if not dtype.startswith(("int", "uint")):
        raise DataError(f"label column '{label_col}' holds {dtype} values, not integer classes")
    for part in splits.values():
        labels = np.asarray(part[label_col])
        bad = labels[(labels < 0) | (labels >= cfg.num_classes)]
        if len(bad):
            raise DataError(f"label {int(bad[0])} in column '{label_col}' is outside num_classes={cfg.num_classes}")
    return cfg.num_classes


def _decoded(part, image_col, label_col, cfg, lazy, log):
    """``part`` yielding {"image": [C,H,W] in [-1, 1], "label"} rows: decoded by a ``datasets``
    transform, or by ``LazyImages`` (which skips what does not decode) when ``lazy``."""
    if lazy:
        return LazyImages(part, image_col, label_col, cfg, log)

    def transform(batch):
        out = {"image": [decode_image(v, cfg) for v in batch[image_col]]}
        out["label"] = list(batch[label_col]) if label_col else [0] * len(out["image"])
        return out

    part.set_transform(transform)
    return part


def step_positions(step, global_batch, count, offset=0):
    """Positions in the endless example stream used by ``step``: the global batch of step s
    covers positions [s * B, (s + 1) * B); a process or micro-batch takes a slice of it."""
    start = step * global_batch + offset
    return torch.arange(start, start + count)


def seeded_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for one (seed, index) pair, e.g. (data seed, epoch) here or (data
    seed, step) for training's t and noise: the two mixed into one integer (a prime stride,
    so nearby seeds do not share streams), a pure function of both."""
    return torch.Generator().manual_seed(mixed_seed(seed, index))


def mixed_seed(seed: int, index: int) -> int:
    """One integer seed for the pair (seed, index), a prime stride apart so that nearby seeds
    do not share streams: the one mixing rule for step generators and per-process seeds."""
    return int(seed) * 1_000_003 + int(index)


def positions_to_indices(positions, n, seed):
    """Map stream positions to example indices: epoch e = pos // n is a fresh permutation of
    the n examples drawn from a generator seeded by (seed, e)."""
    out = torch.empty_like(positions)
    epochs = positions // n
    for e in torch.unique(epochs).tolist():
        perm = torch.randperm(n, generator=seeded_generator(seed, e))
        mask = epochs == e
        out[mask] = perm[positions[mask] % n]
    return out


def batch_slice(micro: int, rank: int, global_batch: int, grad_accum: int, world_size: int) -> slice:
    """Which part of a step's global batch one process's micro-batch is: the batch split into
    ``grad_accum`` micro-batches, each split over ``world_size`` processes."""
    per = global_batch // (grad_accum * world_size)
    start = micro * (global_batch // grad_accum) + rank * per
    return slice(start, start + per)


def batch_indices(step, micro, rank, n, seed, global_batch, grad_accum, world_size):
    """The dataset indices of one process's micro-batch. Their union over processes and
    micro-batches does not depend on how many of either there are."""
    sl = batch_slice(micro, rank, global_batch, grad_accum, world_size)
    return positions_to_indices(step_positions(step, global_batch, sl.stop - sl.start, sl.start), n, seed)


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler yielding this process's micro-batches from ``start_step`` on."""

    def __init__(self, start_step, max_steps, n, seed, global_batch, grad_accum, rank, world_size):
        self.args = start_step, max_steps, n, seed, global_batch, grad_accum, rank, world_size

    def __len__(self):
        start, stop, *_, grad_accum, _, _ = self.args
        return (stop - start) * grad_accum

    def __iter__(self):
        start, stop, n, seed, gb, ga, rank, world = self.args
        for step in range(start, stop):
            for micro in range(ga):
                yield batch_indices(step, micro, rank, n, seed, gb, ga, world).tolist()


def _collate(rows):
    return torch.stack([r["image"] for r in rows]), torch.tensor([r["label"] for r in rows])


def train_loader(data, cfg, start_step, rank, world_size, seed):
    """A DataLoader over the training split yielding (images, labels) micro-batches for
    steps ``start_step .. cfg.max_steps - 1`` on process ``rank``. (Not passed through
    ``accelerator.prepare``: the sharding above is already per process and step-indexed,
    which is what makes resume exact.)"""
    check_batch_split(cfg.batch_size, cfg.grad_accum, world_size)
    sampler = StepBatches(start_step, cfg.max_steps, len(data.train), seed, cfg.batch_size,
                          cfg.grad_accum, rank, world_size)
    # Its own generator: starting an iterator draws a seed, which must not come from the
    # global RNG (dropout's), or a resumed run would see different dropout masks.
    return torch.utils.data.DataLoader(data.train, batch_sampler=sampler, num_workers=cfg.num_workers,
                                       collate_fn=_collate, generator=torch.Generator().manual_seed(seed))


def fixed_batch(split: object, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` examples of a split (e.g. the held-out batch for eval loss)."""
    rows = [split[i] for i in range(min(count, len(split)))]
    return _collate(rows)


# --- what the model sees besides the examples -------------------------------------------

def draw_step_inputs(sampler: ScheduleSampler, gen: torch.Generator, shape: tuple[int, ...], random_flip: bool,
                     label_drop: float = 0.0) -> tuple[torch.Tensor, ...]:
    """t, importance weights, noise, flip mask and label-drop mask for a whole global batch
    of ``shape``, drawn in one go so that they do not depend on the number of processes or
    micro-batches (each takes the slice ``batch_slice`` gives it, as it does for the
    examples). The drop mask is drawn last and only when ``label_drop`` > 0, so runs without
    label dropout see exactly the t, noise and flips they saw before the option existed."""
    t, w = sampler.sample(shape[0], "cpu", generator=gen)
    noise = torch.randn(shape, generator=gen)
    flip = torch.rand(shape[0], generator=gen) < 0.5 if random_flip else torch.zeros(shape[0], dtype=torch.bool)
    drop = (
        torch.rand(shape[0], generator=gen) < label_drop if label_drop > 0 else torch.zeros(shape[0], dtype=torch.bool)
    )
    return t, w, noise, flip, drop


def eval_batch(data: ImageData, diffusion: GaussianDiffusion, cfg: TrainConfig, device: "torch.device | str") -> dict:
    """A fixed held-out batch with fixed t and noise (the same numbers for every run), and
    its first 32 noised images for the stability diagnostics."""
    x, y = fixed_batch(data.eval if data.eval is not None else data.train, cfg.eval_batch_size)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=g)
    noise = torch.randn(x.shape, generator=g)
    y = y if cfg.class_cond else None
    n = min(32, x.shape[0])
    diag = (diffusion.q_sample(x[:n], t[:n], noise[:n]).to(device), diffusion.model_timesteps(t[:n]).to(device),
            None if y is None else y[:n].to(device))
    return dict(x=x, t=t, noise=noise, kwargs={} if y is None else {"y": y.to(device)}, diag=diag)


# --- the real images evaluation compares against ----------------------------------------

def held_out_data(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out split the training loop made for ``cfg`` as (images [-1, 1], labels)."""
    data = load_image_data(cfg, log=lambda *_: None)
    if data.eval is None or len(data.eval) == 0:
        raise DataError(f"dataset '{cfg.dataset}' has no held-out split (eval_fraction={cfg.eval_fraction})")
    return fixed_batch(data.eval, len(data.eval))


def split_uint8(cfg: TrainConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of ``cfg``'s data as (NHWC uint8 images, labels), as the model sees it ("train",
    or "held_out": the split ``held_out_data`` gives)."""
    return splits_uint8(cfg, split)[0]


def splits_uint8(cfg: TrainConfig, *splits: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``split_uint8`` of several splits from one read of the data."""
    data = load_image_data(cfg, log=lambda *_: None)
    out = []
    for split in splits:
        part = data.train if split == "train" else data.eval
        if part is None or len(part) == 0:
            raise DataError(f"dataset '{cfg.dataset}' has no {split} split (eval_fraction={cfg.eval_fraction})")
        images, labels = fixed_batch(part, len(part))
        out.append((to_uint8(images), labels.numpy()))
    return out


def real_digits(image_size: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as the training loop sees them at ``image_size``, split as it
    splits them: ((train images, labels), (held-out images, labels)), images NHWC uint8."""
    from unet.config import TrainConfig

    cfg = TrainConfig(dataset="digits", image_size=image_size, channels=1, report_to="none")
    return tuple(splits_uint8(cfg, "train", "held_out"))
