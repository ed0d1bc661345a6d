"""
What samples are measured against, for a training config or a checkpoint: the feature space
(``feature_space``: the data's own judge where it has one, else Inception), the extractor and
judge for it (``extractor_for``: the digit judge, ``digit_reference``, fitted once per process;
the MNIST family's conv judge, ``judge_reference``, cached on disk), the reference features of a
config (``load_reference``: ``fid_ref``, else its held-out split), and FID, KID,
precision/recall with the judge's figures (``sample_quality``). The training loop
(``unet.train.quality``) and ``evaluate.py`` measure with these same functions.
"""

import functools
from collections.abc import Callable

import numpy as np
import torch

from unet.config import TrainConfig
from unet.data.dataset import real_digits, split_uint8, splits_uint8

from .conv_judge import ConvJudge, fit_conv_judge
from .fid import InceptionFeatures, reference_from
from .judge import DigitJudge, DigitReference, digit_quality, fit_digit_reference
from .metrics import Reference, ReferenceError, quality


@functools.lru_cache(maxsize=4)
def digit_reference(image_size: int, seed: int = 0) -> DigitReference:
    """The digit judge fitted on the real training digits at ``image_size``, with the real
    digits (a ``DigitReference``); fitted once per process."""
    return fit_digit_reference(*real_digits(image_size), seed=seed)


# Data sets with a judge of their own: the digits' MLP, the MNIST family's conv net.
JUDGED = ("digits", "fashion_mnist", "idx")


def judge_reference(cfg: TrainConfig, log: Callable[[str], object] = print) -> DigitReference:
    """The judge of ``cfg``'s data (a ``DigitReference``: judge, train and held-out images):
    the digit judge for digits, else the MNIST family's ``ConvJudge`` (cached on disk, and
    kept once per process)."""
    if cfg.dataset == "digits":
        return digit_reference(cfg.image_size)
    if cfg.dataset not in JUDGED or cfg.channels != 1:
        raise ReferenceError(f"dataset '{cfg.dataset}' has no judge (only {', '.join(JUDGED)} do): "
                             "use --features inception")
    key = (cfg.dataset, cfg.data_dir, cfg.image_size, cfg.cache_dir)
    if key not in _CONV_REFERENCES:
        plain = cfg.replace(class_cond=False, report_to="none")  # the judge takes the labels as they are
        train, held = splits_uint8(plain, "train", "held_out")
        _CONV_REFERENCES[key] = DigitReference(fit_conv_judge(train, held, log=log), train, held)
    return _CONV_REFERENCES[key]


_CONV_REFERENCES = {}


def feature_space(cfg: TrainConfig) -> str:
    """``fid_features`` resolved: "judge" for data sets that have one (auto), else "inception"."""
    if cfg.fid_features != "auto":
        return cfg.fid_features
    return "judge" if cfg.dataset in JUDGED and cfg.channels == 1 else "inception"


def extractor_for(space: str, image_shape: tuple[int, ...], weights: "str | None" = None,
                  device: "str | torch.device" = "cpu", cfg: "TrainConfig | None" = None,
                  log: Callable[[str], object] = print,
                  download: bool = False) -> "tuple[InceptionFeatures | DigitJudge | ConvJudge, DigitReference | None]":
    """(feature extractor, ``DigitReference`` or None) for feature space "judge" or "inception"
    and images of ``image_shape`` (H, W, C); a missing Inception or judge is a ``ReferenceError``.

    :param cfg: the training config whose data the judge knows (None: the digits).
    :param download: Inception's weights may be downloaded into the cache when missing."""
    if space == "judge":
        if image_shape[-1] != 1:
            raise ReferenceError(f"the judges read 1-channel images, these have {image_shape[-1]} "
                                 "channels: use --features inception")
        digits = digit_reference(int(image_shape[0])) if cfg is None else judge_reference(cfg, log)
        return digits.judge, digits
    return InceptionFeatures(image_shape, weights, device, download=download), None


def load_reference(cfg: TrainConfig, extractor: "InceptionFeatures | DigitJudge | ConvJudge") -> tuple[Reference, str]:
    """(``Reference``, one line saying what it is) for ``cfg.fid_ref``, or the held-out split."""
    if cfg.fid_ref:
        return reference_from(cfg.fid_ref, extractor)
    images, _ = split_uint8(cfg, "held_out" if cfg.eval_fraction > 0 else "train")
    ref = Reference(extractor.name, tuple(images.shape[1:]), extractor.features(images), source="held-out split")
    return ref, f"reference: the {ref.source} of '{cfg.dataset}', {len(images)} images"


def sample_quality(ref: Reference, extractor: "InceptionFeatures | DigitJudge | ConvJudge",
                   digits: "DigitReference | None", images: np.ndarray, labels: "np.ndarray | None",
                   kid_subset_size: int, seed: int = 0) -> dict:
    """
    ``metrics.quality`` of ``images`` (NHWC uint8) in ``extractor``'s features against ``ref``
    (with the Inception Score when the extractor also gives class logits, as ``InceptionFeatures``
    does), and with the digit judge (``digits``, a ``DigitReference``, or None) its Frechet distance,
    real-vs-real floor and accuracy on ``labels`` as ``judge_fd``, ``judge_fd_floor``,
    ``judge_accuracy``: what training logs and ``evaluate.py fid`` prints.
    """
    if hasattr(extractor, "features_and_logits"):
        features, logits = extractor.features_and_logits(images)
    else:
        features, logits = extractor.features(images), None
    m = quality(ref, features, kid_subset_size, seed=seed, logits=logits)
    if digits is not None:
        judged = digit_quality(images, labels, seed=seed, reference=digits)
        m.update({f"judge_{k}": judged[k] for k in ("accuracy", "fd", "fd_floor") if k in judged})
    return m
