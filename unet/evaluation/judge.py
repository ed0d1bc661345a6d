"""
Sample quality on the digits: a small classifier trained on scikit-learn's real digits (the
training split of the same held-out split the training loop makes) judges samples by its
accuracy on their labels (class-conditional models) or its confidence and class histogram
(unconditional ones), and by a Frechet distance in its hidden-layer features against the
held-out real digits, printed beside the same distance for as many real training digits (the
floor that sampling noise alone gives). Used by ``unet.evaluation.evaluate``.
"""

import functools
import warnings

import numpy as np
import torch
from scipy import linalg

from unet.utils.images import to_uint8


def real_digits(image_size, channels=1):
    """scikit-learn's digits as the training loop sees them at ``image_size``, split as it
    splits them: ((train images, labels), (held-out images, labels)), images NHWC uint8."""
    from unet.train.config import TrainConfig
    from unet.train.data import load_image_data

    cfg = TrainConfig(dataset="digits", image_size=image_size, channels=channels, report_to="none")
    data = load_image_data(cfg, log=lambda *_: None)

    def arrays(split):
        rows = [split[i] for i in range(len(split))]
        return to_uint8(torch.stack([r["image"] for r in rows])), np.array([r["label"] for r in rows])

    return arrays(data.train), arrays(data.eval)


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


@functools.lru_cache(maxsize=4)
def digit_judge(image_size, seed=0):
    """(judge, real training digits, held-out real digits) at ``image_size``, fitted once."""
    train, held = real_digits(image_size)
    return DigitJudge(*train, seed=seed), train, held


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b`` ([N x D]):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as FID computes it."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # a near-singular product is handled below
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():  # regularise, as pytorch-fid does
            eps = np.eye(len(s_a)) * 1e-6
            covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean.real)
    return max(float(fd), 0.0)  # rounding can give -1e-13 for identical sets


def check_sample_count(n):
    """The Frechet distance fits a covariance: it needs at least two samples."""
    if n < 2:
        raise ValueError(f"digit quality needs at least 2 samples (the Frechet distance fits a covariance), got {n}")


def digit_quality(images, labels=None, seed=0):
    """
    Quality of digit samples (NHWC uint8, 1 channel, the training image size).

    :param labels: the labels they were sampled for (class-conditional models).
    :return: dict with ``fd`` (samples vs held-out real), ``fd_floor`` (as many real
        training digits vs held-out real), ``confidence`` (mean top probability),
        ``class_histogram``, ``accuracy`` (labels given), ``judge_accuracy`` (held-out
        real digits), ``n``.
    """
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"digit quality needs 1-channel NHWC samples, got shape {images.shape}; use fid for RGB")
    check_sample_count(len(images))
    judge, (train_x, _), (eval_x, eval_y) = digit_judge(images.shape[1], seed)
    probs = judge.predict_proba(images)
    pred = probs.argmax(1)
    held = judge.features(eval_x)
    # The floor: real digits the model trained on, as many as there are samples.
    pick = np.random.default_rng(seed).permutation(len(train_x))[:len(images)]
    out = dict(n=len(images), n_floor=len(pick), fd=frechet_distance(judge.features(images), held),
               fd_floor=frechet_distance(judge.features(train_x[pick]), held),
               confidence=float(probs.max(1).mean()), class_histogram=np.bincount(pred, minlength=10).tolist(),
               judge_accuracy=float((judge.predict(eval_x) == eval_y).mean()))
    if labels is not None:
        out["accuracy"] = float((pred == np.asarray(labels)).mean())
    return out


def format_quality(q):
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
