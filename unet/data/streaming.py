"""
Data at scale: datasets read as a stream (``streaming: true`` for hub, imagefolder and parquet
sources, always for ``webdataset`` tar shards), each process reading its own share
(``datasets.distributed.split_dataset_by_node``: whole shards when their count divides by
the process count, else every n-th example), decoded one example at a time with corrupt
images skipped and counted.

Resume restores the stream position (``IterableDataset.state_dict``, per process, saved in
the checkpoint). What is exact: with ``shuffle_buffer: 0`` the resumed run reads exactly the
examples a straight run would have read next. With a shuffle buffer the examples that were in
the buffer at the checkpoint are lost (datasets refills it from the position it restores), so
no example repeats within the epoch but the order, and so the weights, differ from a straight
run's. t, noise and flips are drawn per step as for every source, so they are always exact.
"""

import torch

from unet.config import TrainConfig

from . import dataset as data_mod
from .dataset import DECODE_ERRORS, DataError, ImageData, _load_raw, columns, decode_image, load_args


def decode(example, image_col, label_col, cfg):
    """(image tensor, label) of one raw example, or None for an image that does not decode."""
    try:
        x = decode_image(example[image_col], cfg)
    except DECODE_ERRORS:
        return None
    y = int(example[label_col]) if label_col else 0
    if cfg.class_cond and not 0 <= y < cfg.num_classes:
        raise DataError(f"label {y} in column '{label_col}' is outside num_classes={cfg.num_classes}")
    return x, y


def load_stream(raw, cfg, log):
    """An ``ImageData`` whose ``train`` is the raw training stream (undecoded images) and whose
    held-out split is the first ``eval_batch_size`` decodable examples of the test/validation
    stream, or, without one, of the training stream (which are then trained on as well: a
    stream has no fixed split to hold out)."""
    import datasets

    split = "train" if "train" in raw else next(iter(raw))
    image_col, label_col = columns(raw[split].features, cfg)
    if cfg.class_cond and not label_col:
        raise DataError(f"class_cond is true but dataset '{cfg.dataset}' has no label column; set --label_column "
                        "or --class_cond false")
    streams = {k: v.cast_column(image_col, datasets.Image(decode=False)) for k, v in raw.items()}
    held_name = next((s for s in ("test", "validation") if s in streams and s != split), split)
    if held_name == split:
        log(f"streaming: no held-out split; the eval loss uses the first {cfg.eval_batch_size} training examples")
    held = []
    for example in streams[held_name]:
        item = decode(example, image_col, label_col, cfg)
        if item is not None:
            held.append({"image": item[0], "label": item[1]})
        if len(held) == cfg.eval_batch_size:
            break
    if not held:
        raise DataError(f"dataset '{cfg.dataset}' has no readable images")
    features = raw[split].features or {}
    num_classes = features[label_col].num_classes if label_col and isinstance(
        features.get(label_col), datasets.ClassLabel) else (cfg.num_classes if label_col else 0)
    data = ImageData(streams[split], held, num_classes, 0)
    data.stream = dict(image_col=image_col, label_col=label_col, live=None, resume=None, log=log)
    return data


def is_stream(cfg):
    """Whether cfg's source is read as a stream."""
    return cfg.streaming or cfg.dataset == "webdataset"


def check_source(cfg: TrainConfig) -> None:
    """What can be checked of the data before any work (the webdataset shards exist): a
    one-line ``ConfigError``."""
    if cfg.dataset == "webdataset":
        load_args(cfg)


def load_data(cfg, log=print):
    """The run's ``ImageData``: ``load_stream`` for a stream, else ``dataset.load_image_data``."""
    if not is_stream(cfg):
        return data_mod.load_image_data(cfg, log=log)
    return load_stream(_load_raw(cfg), cfg, log)


def train_loader(data, cfg, start_step, rank, world_size, seed):
    """This process's micro-batches from ``start_step`` on: ``StreamBatches`` for a stream
    (which continues from its restored position, whatever ``start_step``), else
    ``dataset.train_loader``'s step-indexed ones."""
    if getattr(data, "stream", None) is None:
        return data_mod.train_loader(data, cfg, start_step, rank, world_size, seed)
    data_mod.check_batch_split(cfg.batch_size, cfg.grad_accum, world_size)
    return StreamBatches(data, cfg, rank, world_size, seed, cfg.batch_size // (cfg.grad_accum * world_size))


class StreamBatches:
    """
    This process's micro-batches from a stream, epoch after epoch (the shuffle reseeded per
    epoch by ``set_epoch``), corrupt images skipped and counted in ``data.skipped``.

    :param data: ``load_stream``'s ``ImageData``; ``data.stream["resume"]`` a saved ``state_dict()``.
    :param per: examples per micro-batch on this process.
    """

    def __init__(self, data, cfg, rank, world_size, seed, per):
        from datasets.distributed import split_dataset_by_node

        self.data, self.cfg, self.seed, self.per = data, cfg, seed, per
        self.base = split_dataset_by_node(data.train, rank=rank, world_size=world_size)
        states = data.stream["resume"]
        if states is not None and len(states) != world_size:
            raise DataError(f"the checkpoint's stream positions are of {len(states)} process(es), this run has "
                            f"{world_size}: a stream split by node resumes with the same process count only")
        saved = states[rank] if states else None
        self.epoch = saved["epoch"] if saved else 0
        self.saved = saved
        self.ds = None
        data.stream["live"] = self

    def _epoch(self):
        """The stream of ``self.epoch``, at the saved position the first time after a resume."""
        ds = self.base.shuffle(seed=self.seed, buffer_size=self.cfg.shuffle_buffer) if self.cfg.shuffle_buffer \
            else self.base
        ds.set_epoch(self.epoch)
        if self.saved is not None:
            if self.saved["stream"] is not None:
                ds.load_state_dict(self.saved["stream"])
            self.data.skipped = self.saved["skipped"]
            self.saved = None
        self.ds = ds
        return ds

    def __iter__(self):
        cols = self.data.stream["image_col"], self.data.stream["label_col"]
        xs, ys = [], []
        while True:
            seen = 0
            for example in self._epoch():
                seen += 1
                item = decode(example, *cols, self.cfg)
                if item is None:
                    self.data.skipped += 1
                    n = self.data.skipped
                    if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th, ...: seen, without a line per image
                        self.data.stream.get("log", print)(
                            f"streaming: skipped an image that does not decode ({n} skipped so far in this run)")
                    continue
                xs.append(item[0])
                ys.append(item[1])
                if len(xs) == self.per:
                    yield torch.stack(xs), torch.tensor(ys)
                    xs, ys = [], []
            if not seen:
                raise DataError(f"dataset '{self.cfg.dataset}': this process's share of the stream is empty")
            self.epoch += 1

    def state_dict(self):
        """Where this process's stream stands: the position of the last example it yielded."""
        return {"epoch": self.epoch, "stream": self.ds.state_dict() if self.ds is not None else None,
                "skipped": self.data.skipped}


def checkpoint_state(run):
    """Every process's stream position, gathered (a collective: call on every process), for
    the checkpoint; {} for a source that is not a stream."""
    live = getattr(run.data, "stream", None)
    if not live:
        return {}
    from accelerate.utils import gather_object

    states = [live["live"].state_dict()]
    if run.accelerator.num_processes > 1:
        states = gather_object(states)
    return {"stream": states}
