"""FID, KID and precision/recall against independent computations and known answers, and
reference statistics as files: round trip, the three kinds of reference, refusals."""

import numpy as np
import pytest
import torch
from cli_errors import refused
from PIL import Image
from scipy import linalg
from torchmetrics.image.fid import FrechetInceptionDistance

from unet.cli.evaluate import main
from unet.config import FID_SCHEDULERS, ConfigError, TrainConfig
from unet.evaluation.fid import reference_from
from unet.evaluation.metrics import (
    Reference,
    ReferenceError,
    frechet_distance,
    kernel_distance,
    load_reference_file,
    precision_recall,
    save_reference,
)
from unet.sample.sampling import SCHEDULERS


def correlated(rng, n, d=8, shift=0.0):
    mix = np.random.default_rng(99).normal(size=(d, d))  # one covariance for every set
    return rng.normal(size=(n, d)) @ mix + shift


def scipy_fid(a, b):
    """FID from its definition with scipy's matrix square root: an independent computation."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)


def test_fid_is_zero_for_a_set_against_itself_and_grows_with_noise():
    rng = np.random.default_rng(0)
    a = correlated(rng, 500)
    scale = np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, a) < 1e-8 * scale  # float64 rounding of a trace of this size
    noise = rng.normal(size=a.shape)
    fids = [frechet_distance(a, a + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert all(x < y for x, y in zip(fids, fids[1:])), fids


def test_fid_equals_scipy_sqrtm_and_torchmetrics_on_images():
    rng = np.random.default_rng(1)
    a, b = correlated(rng, 400), correlated(rng, 300, shift=0.5) * 1.3
    ours = frechet_distance(a, b)
    assert ours == pytest.approx(scipy_fid(a, b), rel=1e-4)
    # torchmetrics used as its docs show, on images through a feature module: the same features.
    weight = torch.from_numpy(np.random.default_rng(2).normal(size=(12, 8)))
    images_a = torch.from_numpy(np.linalg.lstsq(weight.numpy().T, a.T, rcond=None)[0].T)
    images_b = torch.from_numpy(np.linalg.lstsq(weight.numpy().T, b.T, rcond=None)[0].T)
    net = torch.nn.Linear(12, 8, bias=False).double()
    net.weight.data = weight.T.contiguous()
    net.num_features = 8
    metric = FrechetInceptionDistance(feature=net)
    metric.update(images_a, real=True)
    metric.update(images_b, real=False)
    assert frechet_distance(net(images_a).detach().numpy(), net(images_b).detach().numpy()) == pytest.approx(
        float(metric.compute()), rel=1e-9)
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)  # lstsq recovers the features to ~1e-12


def unbiased_mmd(x, y):
    """KID's unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written from Binkowski et al. Eq. 4."""
    d = x.shape[1]
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m = len(x)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_is_the_unbiased_mmd_and_unbiased():
    rng = np.random.default_rng(3)
    x, y = correlated(rng, 50, 4), correlated(rng, 50, 4, shift=0.3)
    # With subsets as large as the sets every subset is the whole set: the estimator itself.
    mean, std = kernel_distance(x, y, subset_size=50, subsets=3)
    assert mean == pytest.approx(unbiased_mmd(x, y), rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    # Same distribution: the unbiased estimate averages to 0 over draws (within 4 standard
    # errors), where the biased one (diagonals kept) is positive by far more.
    draws, biased = [], []
    for _ in range(200):
        a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
        draws.append(kernel_distance(a, b, subset_size=30, subsets=1)[0])
        k = lambda p, q: (p @ q.T / 4 + 1) ** 3  # noqa: E731
        biased.append(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
    se = np.std(draws, ddof=1) / np.sqrt(len(draws))
    assert abs(np.mean(draws)) < 4 * se
    assert np.mean(biased) > 10 * se


def test_precision_recall_on_point_clouds_with_known_answers():
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)  # spacing 1
    far = grid + 100.0
    assert precision_recall(grid, grid) == (1.0, 1.0)
    assert precision_recall(grid, far) == (0.0, 0.0)
    # Half the samples on the real points, half far away: precision 1/2; the real-side samples'
    # own k-NN balls (radius 1 or sqrt 2, the far half being 100 away) cover every real point.
    assert precision_recall(grid, np.concatenate([grid, far])) == (0.5, 1.0)
    # Mode collapse: every sample at one real point. Precise, and recalls only the points its
    # zero-radius balls touch: that one.
    collapsed = np.repeat(grid[:1], 20, axis=0)
    assert precision_recall(grid, collapsed) == (1.0, 0.01)


class FlatPixels:
    """A stand-in extractor: pixels as features."""

    def __init__(self, shape, name="flat-pixels"):
        self.image_shape, self.name = shape, name

    def features(self, images):
        return images.reshape(len(images), -1).astype(np.float64)


def test_reference_statistics_round_trip_and_refuse_another_extractor(tmp_path):
    rng = np.random.default_rng(4)
    ref = Reference("flat-pixels", (4, 4, 1), rng.normal(size=(30, 16)))
    save_reference(tmp_path / "ref.npz", ref)
    back = load_reference_file(tmp_path / "ref.npz")
    np.testing.assert_array_equal(back.features, ref.features)
    np.testing.assert_allclose(np.load(tmp_path / "ref.npz")["sigma"], ref.sigma)
    assert back.image_shape == (4, 4, 1) and back.extractor == "flat-pixels"
    with pytest.raises(ReferenceError, match="feature extractor 'flat-pixels'.*'other'") as e:
        back.check("other", (4, 4, 1), "ref.npz")
    assert "\n" not in str(e.value)
    with pytest.raises(ReferenceError, match="reference images are 4x4x1, the samples 8x8x1"):
        back.check("flat-pixels", (8, 8, 1), "ref.npz")


def test_a_reference_is_a_statistics_file_a_folder_or_an_image_batch(tmp_path):
    images = np.random.default_rng(5).integers(0, 256, (6, 4, 4, 1), dtype=np.uint8)
    extractor = FlatPixels((4, 4, 1))
    (tmp_path / "folder").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(tmp_path / "folder" / f"{i}.png")
    np.savez(tmp_path / "batch.npz", images)  # guided-diffusion's layout: arr_0
    save_reference(tmp_path / "stats.npz", Reference("flat-pixels", (4, 4, 1), extractor.features(images)))
    for path, kind in (("folder", "a folder of images"), ("batch.npz", "a reference batch of images in arr_0"),
                       ("stats.npz", "reference statistics")):
        ref, line = reference_from(str(tmp_path / path), extractor)
        np.testing.assert_array_equal(ref.features, extractor.features(images))
        assert line.startswith(f"reference: {kind}") and line.endswith("6 images of 4x4x1")
    with pytest.raises(ReferenceError, match="the samples 8x8x1"):
        reference_from(str(tmp_path / "batch.npz"), FlatPixels((8, 8, 1)))


def test_ref_and_fid_command_lines(tmp_path, capsys):
    """``ref`` from the digits config, then ``fid`` of real training digits against it; a file
    of another extractor, a missing file and too large a KID subset are one line, exit 2."""
    from unet.evaluation.quality import digit_reference

    main(["ref", "--data", "configs/digits.yaml", "--out", str(tmp_path / "ref.npz")])
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'ref.npz'}: 180 images of 8x8x1, features digit-")
    train_x, train_y = digit_reference(8).train
    np.savez(tmp_path / "s.npz", train_x[:300], train_y[:300])
    main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("reference: reference statistics") and out[1].startswith("samples: 300 (reference: 180")
    assert out[3].startswith("KID: ") and "subsets of 180" in out[3] and out[4].startswith("precision: ")
    assert float(out[2].split()[1]) < 5.0  # real digits: near the real-vs-real floor the last line prints
    assert out[5].startswith("judge: Frechet distance ")
    save_reference(tmp_path / "other.npz", Reference("other-features", (8, 8, 1), np.zeros((3, 2))))
    for ref, words in (("other.npz", "feature extractor 'other-features'"), ("none.npz", "reference not found")):
        assert words in refused(main, ["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / ref)],
                                capsys)
    assert "--kid_subset_size 500 must be between 2 and" in refused(
        main, ["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--kid_subset_size",
               "500"], capsys)


def test_fid_keys_are_checked_in_one_line():
    assert FID_SCHEDULERS == SCHEDULERS  # the config's torch-free copy of the names
    for overrides, words in (({"fid_num_samples": 1}, "fid_num_samples"),
                             ({"fid_num_samples": 50, "kid_subset_size": 100}, "kid_subset_size (100)"),
                             ({"fid_steps": 0}, "fid_steps"), ({"fid_scheduler": "euler"}, "fid_scheduler")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
            TrainConfig(**overrides)
        assert "\n" not in str(e.value)
