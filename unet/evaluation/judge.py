"""
Sample quality on the digits: a small classifier trained on scikit-learn's real digits (the
training split of the same held-out split the training loop makes) judges samples by its
accuracy on their labels (class-conditional models) or its confidence and class histogram
(unconditional ones), and by a Frechet distance in its hidden-layer features against the
held-out real digits, printed beside the same distance for as many real training digits (the
floor that sampling noise alone gives). The real digits are given (``unet.data.dataset.real_digits``
loads them); the distance is ``unet.evaluation.metrics.frechet_distance``, FID's own code.
"""

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .metrics import frechet_distance

if TYPE_CHECKING:
    from .conv_judge import ConvJudge


def flat_pixels(images):
    """NHWC uint8 -> [N x H*W*C] floats in [0, 1], the classifier's input."""
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


class DigitJudge:
    """
    A one-hidden-layer MLP trained on real digits: it labels samples and its hidden layer
    is the feature space of the Frechet distance (the role Inception plays in FID).

    :param hidden: width of the hidden layer (the feature dimension).
    """

    def __init__(self, images, labels, hidden=64, seed=0):
        from sklearn.neural_network import MLPClassifier

        self.clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=2000, random_state=seed)
        self.clf.fit(flat_pixels(images), labels)
        # Units dead on every real digit are constant features: they make covariances singular.
        self.alive = self.hidden(images).std(0) > 0
        self.image_shape = tuple(images.shape[1:])
        # Keyed by its weights, so that statistics of another fit (seed, data, library
        # version) are refused rather than compared.
        digest = hashlib.sha1(b"".join(np.ascontiguousarray(w).tobytes() for w in self.clf.coefs_)).hexdigest()[:12]
        self.name = f"digit-judge-{hidden}-{digest}"

    def hidden(self, images):
        """Hidden-layer (ReLU) activations of every unit, [N x hidden]."""
        return np.maximum(flat_pixels(images) @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0)

    def features(self, images):
        """Hidden-layer activations of the units alive on real digits, [N x D]."""
        return self.hidden(images)[:, self.alive]

    def predict_proba(self, images):
        return self.clf.predict_proba(flat_pixels(images))

    def predict(self, images):
        return self.clf.predict(flat_pixels(images))


@dataclass
class DigitReference:
    """A fitted judge with the real digits it judges against: (images NHWC uint8, labels) of
    the training split (its fit, and the floor) and of the held-out split (the reference)."""

    judge: "DigitJudge | ConvJudge"  # the digits' MLP, or the MNIST family's conv net (conv_judge)
    train: tuple
    held: tuple

    @functools.cached_property
    def held_features(self):
        """The judge's features of the held-out images (computed once: every measurement needs them)."""
        return self.judge.features(self.held[0])

    @functools.cached_property
    def judge_accuracy(self):
        """The judge's accuracy on the held-out images."""
        return float((self.judge.predict(self.held[0]) == self.held[1]).mean())


def fit_digit_reference(train, held, seed=0):
    """A ``DigitReference``: the judge fitted on ``train`` = (images, labels)."""
    return DigitReference(DigitJudge(*train, seed=seed), train, held)


def check_sample_count(n: int) -> None:
    """The Frechet distance fits a covariance: it needs at least two samples."""
    if n < 2:
        raise ValueError(f"digit quality needs at least 2 samples (the Frechet distance fits a covariance), got {n}")


def digit_quality(images: np.ndarray, labels: "np.ndarray | Sequence[int] | None" = None, seed: int = 0, *,
                  reference: "DigitReference") -> dict:
    """
    Quality of digit samples (NHWC uint8, 1 channel, the training image size).

    :param labels: the labels they were sampled for (class-conditional models).
    :param reference: a ``DigitReference`` at the samples' image size.
    :return: dict with ``fd`` (samples vs held-out real), ``fd_floor`` (as many real
        training digits vs held-out real), ``confidence`` (mean top probability),
        ``class_histogram``, ``accuracy`` (labels given), ``judge_accuracy`` (held-out
        real digits), ``n``.
    """
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"digit quality needs 1-channel NHWC samples, got shape {images.shape}; use fid for RGB")
    check_sample_count(len(images))
    judge, (train_x, _) = reference.judge, reference.train
    if tuple(images.shape[1:]) != judge.image_shape:
        raise ValueError(f"samples are {images.shape[1]}x{images.shape[2]}, the judge reads "
                         f"{judge.image_shape[0]}x{judge.image_shape[1]}")
    probs = judge.predict_proba(images)
    pred = probs.argmax(1)
    held = reference.held_features
    # The floor: real digits the model trained on, as many as there are samples.
    pick = np.random.default_rng(seed).permutation(len(train_x))[:len(images)]
    out = dict(n=len(images), n_floor=len(pick), fd=frechet_distance(held, judge.features(images)),
               fd_floor=frechet_distance(held, judge.features(train_x[pick])),
               confidence=float(probs.max(1).mean()), class_histogram=np.bincount(pred, minlength=10).tolist(),
               judge_accuracy=reference.judge_accuracy)
    if labels is not None:
        out["accuracy"] = float((pred == np.asarray(labels)).mean())
    return out


def format_quality(q: dict) -> str:
    """One line per measure, for people."""
    lines = [f"samples: {q['n']}",
             f"Frechet distance (classifier features) vs held-out real digits: {q['fd']:.3f} "
             f"(real-vs-real floor, {q['n_floor']} real training digits: {q['fd_floor']:.3f})"]
    if "accuracy" in q:
        lines.append(f"classifier accuracy on the requested labels: {q['accuracy']:.3f}")
    lines.append(f"mean classifier confidence: {q['confidence']:.3f}")
    lines.append(f"predicted class histogram: {q['class_histogram']}")
    lines.append(f"(classifier accuracy on held-out real digits: {q['judge_accuracy']:.3f})")
    return "\n".join(lines)
