"""The MNIST family's judge: cached by data and settings, the same features from its cache in
every call, the measures the digits' judge gives, and (slow) at least 0.90 accuracy on
Fashion-MNIST's test split."""

import os

import numpy as np
import pytest

from unet.evaluation.conv_judge import JudgeSettings, fit_conv_judge
from unet.evaluation.judge import DigitReference, digit_quality

TINY = JudgeSettings(conv=(4, 8), hidden=16, epochs=10, batch_size=32, lr=0.01)


def toy(n, seed):
    """Class c: a bright 4-pixel-high bar at rows 2c..2c+3 (an easy task), NHWC uint8."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 5
    x = rng.integers(0, 40, (n, 12, 12, 1), dtype=np.uint8)
    for i, c in enumerate(y):
        x[i, 2 * c: 2 * c + 3] = 220
    return x, y


def test_cached_judge_gives_identical_features(tmp_path):
    train, held = toy(200, 0), toy(50, 1)
    logs = []
    first = fit_conv_judge(train, held, TINY, cache_dir=str(tmp_path), log=logs.append)
    assert "trained" in logs[-1] and len(os.listdir(tmp_path)) == 2  # weights and metadata
    again = fit_conv_judge(train, held, TINY, cache_dir=str(tmp_path), log=logs.append)
    assert "from" in logs[-1] and again.name == first.name and again.test_accuracy == first.test_accuracy
    np.testing.assert_array_equal(first.features(held[0]), again.features(held[0]))
    np.testing.assert_array_equal(again.features(held[0]), again.features(held[0]))
    other = fit_conv_judge(train, held, JudgeSettings(**{**TINY.__dict__, "seed": 1}), cache_dir=str(tmp_path),
                           log=logs.append)
    assert "trained" in logs[-1] and other.name != first.name  # other settings: another judge


def test_the_judge_measures_like_the_digit_judge(tmp_path):
    train, held = toy(300, 0), toy(100, 1)
    judge = fit_conv_judge(train, held, TINY, cache_dir=str(tmp_path), log=lambda *a: None)
    ref = DigitReference(judge, train, held)
    real = digit_quality(*toy(100, 2), reference=ref)
    noise = digit_quality(np.random.default_rng(3).integers(0, 256, (100, 12, 12, 1), dtype=np.uint8),
                          np.arange(100) % 5, reference=ref)
    assert real["accuracy"] > 0.9 and judge.test_accuracy > 0.9
    assert noise["fd"] > 10 * real["fd"]  # noise is far from the real images, fresh real ones are near


REAL = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(REAL), reason="Fashion-MNIST is not installed (apt-get install "
                    "dataset-fashion-mnist)")
def test_fashion_judge_reads_the_test_split_at_least_90_percent(tmp_path, monkeypatch):
    from unet.config import load_config
    from unet.evaluation.quality import judge_reference

    monkeypatch.setenv("UNET_CACHE", str(tmp_path))  # trained here, not read from a cache
    ref = judge_reference(load_config(["--dataset", "fashion_mnist", "--report_to", "none"]), log=print)
    assert ref.judge.test_accuracy >= 0.90 and ref.judge_accuracy == ref.judge.test_accuracy
