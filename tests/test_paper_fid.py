"""A FID a paper would accept: guided-diffusion's reference batches (``arr_0`` images, precomputed
``mu``/``sigma``) with the statistics checked against independent computations, malformed statistics
refused in one line, the Inception Score on known cases and against torchmetrics, and the Inception
weights fetched only when asked (offline: one line). No Inception network runs here (it needs
torchvision, which does not import beside this torch): a fake extractor of width D stands in."""

import functools
import http.server
import socket
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torchmetrics.image.inception import InceptionScore

from unet.evaluation import fid
from unet.evaluation.fid import ensure_inception_weights, reference_from
from unet.evaluation.metrics import (
    Precomputed,
    ReferenceError,
    format_measures,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_score,
    inception_score_from_probabilities,
    quality,
)
from unet.evaluation.quality import sample_quality

D, K, SHAPE = 6, 5, (4, 4, 3)
EPS = np.finfo(np.float64).eps


class LinearFeatures:
    """A stand-in for Inception: a fixed linear map of the pixels to D features (and K logits)."""

    name, image_shape = "fake-linear", SHAPE

    def __init__(self, width=D):
        rng = np.random.default_rng(123)
        self.w = rng.normal(size=(int(np.prod(SHAPE)), width)) / 40
        self.w_logits = rng.normal(size=(width, K))

    def features(self, images):
        return images.reshape(len(images), -1).astype(np.float64) @ self.w


class LinearFeaturesAndLogits(LinearFeatures):
    def features_and_logits(self, images):
        f = self.features(images)
        return f, f @ self.w_logits


def images(seed, n=60, high=256):
    return np.random.default_rng(seed).integers(0, high, (n, *SHAPE), dtype=np.uint8)


def covariance(rng, d=D, cond=10.0):
    """A random covariance with eigenvalues spread over [1, cond]: condition number ``cond``."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s = (q * np.linspace(1.0, cond, d)) @ q.T
    return (s + s.T) / 2


def eigen_fid(mu1, s1, mu2, s2):
    """FID from its definition without scipy's sqrtm: Tr (S1 S2)^(1/2) = sum of the square roots of the
    eigenvalues of S1^(1/2) S2 S1^(1/2) (similar to S1 S2, symmetric), S1^(1/2) from eigh."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fid_tolerance(mu1, s1, mu2, s2, cond):
    """Rounding of the float64 computation: the Schur square root's relative error is of order
    D * cond * eps (Higham, Functions of Matrices, Sec. 6.2), on a sum of size |dmu|^2 + Tr S1 + Tr S2;
    a factor 100 of margin."""
    scale = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2)
    return 100 * D * cond * EPS * scale


# --- the Frechet distance of two Gaussians ----------------------------------------------------

def test_frechet_distance_of_statistics_against_closed_form_and_eigen_computation():
    rng = np.random.default_rng(0)
    # Diagonal covariances: (S1 S2)^(1/2) = diag(sqrt(a b)), so FID = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    mu1, mu2, a, b = rng.normal(size=D), rng.normal(size=D), rng.uniform(1, 10, D), rng.uniform(1, 10, D)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = frechet_distance_from_statistics(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(closed, abs=fid_tolerance(mu1, np.diag(a), mu2, np.diag(b), 10))
    s1, s2 = covariance(rng), covariance(rng)
    got = frechet_distance_from_statistics(mu1, s1, mu2, s2)
    assert got == pytest.approx(eigen_fid(mu1, s1, mu2, s2), abs=fid_tolerance(mu1, s1, mu2, s2, 10))
    assert frechet_distance_from_statistics(mu1, s1, mu1, s1) < fid_tolerance(mu1, s1, mu1, s1, 10)


def test_statistics_path_equals_the_features_path_on_the_same_features():
    """scipy's sqrtm on (mu, sigma) and torchmetrics' eigenvalues on the features: one FID."""
    ext = LinearFeatures()
    real, fake = ext.features(images(1)), ext.features(images(2, high=200))
    s_r, s_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    stats = frechet_distance_from_statistics(real.mean(0), s_r, fake.mean(0), s_f)
    cond = max(np.linalg.cond(s_r), np.linalg.cond(s_f))
    assert stats == pytest.approx(frechet_distance(real, fake), abs=fid_tolerance(real.mean(0), s_r, fake.mean(0),
                                                                                  s_f, cond))


# --- guided-diffusion's reference batch -------------------------------------------------------

def test_a_batch_mu_sigma_are_used_when_present(tmp_path):
    """The official batches' mu/sigma are statistics of the whole training set, not of arr_0's
    images: here they differ on purpose, and FID must follow mu/sigma."""
    ext, rng = LinearFeatures(), np.random.default_rng(3)
    ref_images = images(4)
    mu, sigma = ext.features(ref_images).mean(0) + 0.5, covariance(rng)
    np.savez(tmp_path / "VIRTUAL_fake.npz", arr_0=ref_images, mu=mu, sigma=sigma)
    ref, line = reference_from(str(tmp_path / "VIRTUAL_fake.npz"), ext)
    assert ref.fid_source == "the batch's precomputed mu/sigma"
    assert "FID from mu/sigma, KID and precision/recall from the features of its images" in line
    assert line.endswith("60 images of 4x4x3")
    fake = ext.features(images(5))
    q = quality(ref, fake, kid_subset_size=20)
    s_f = np.cov(fake, rowvar=False)
    expected = eigen_fid(mu, sigma, fake.mean(0), s_f)
    assert q["fid"] == pytest.approx(expected, abs=fid_tolerance(mu, sigma, fake.mean(0), s_f,
                                                                 max(10, np.linalg.cond(s_f))))
    assert q["fid_source"] == ref.fid_source and q["n_ref"] == 60
    # KID and precision/recall still come from arr_0's features (guided-diffusion's evaluator does the same).
    assert q["kid"] == pytest.approx(quality(
        reference_from_images(tmp_path, ref_images, ext), fake, kid_subset_size=20)["kid"], rel=1e-12)
    assert abs(q["fid"] - frechet_distance(ext.features(ref_images), fake)) > 1.0  # not the images' FID
    assert "FID: " in format_measures(q) and "(reference: the batch's precomputed mu/sigma)" in format_measures(q)


def reference_from_images(tmp_path, imgs, ext):
    np.savez(tmp_path / "images_only.npz", arr_0=imgs)
    return reference_from(str(tmp_path / "images_only.npz"), ext)[0]


def test_the_images_are_used_when_the_batch_has_no_statistics(tmp_path):
    ext = LinearFeatures()
    ref_images, fake = images(6), ext.features(images(7))
    ref = reference_from_images(tmp_path, ref_images, ext)
    assert ref.statistics is None and ref.fid_source == "features computed from 60 images"
    q = quality(ref, fake, kid_subset_size=20)
    assert q["fid"] == frechet_distance(ext.features(ref_images), fake)
    assert "(reference: features computed from 60 images)" in format_measures(q)


def test_statistics_without_images_give_fid_and_say_kid_is_unavailable(tmp_path):
    ext, rng = LinearFeatures(), np.random.default_rng(8)
    mu, sigma = rng.normal(size=D), covariance(rng)
    path = str(tmp_path / "stats.npz")
    np.savez(path, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    with pytest.raises(ReferenceError, match="mu/sigma without images in arr_0") as e:
        reference_from(path, ext)
    assert "\n" not in str(e.value)
    ref, line = reference_from(path, ext, allow_statistics_only=True)
    assert ref.features is None and "mu_s/sigma_s (sFID) are not used" in line
    fake = ext.features(images(9))
    q = quality(ref, fake, kid_subset_size=20)
    s_f = np.cov(fake, rowvar=False)
    assert q["fid"] == pytest.approx(eigen_fid(mu, sigma, fake.mean(0), s_f),
                                     abs=fid_tolerance(mu, sigma, fake.mean(0), s_f, max(10, np.linalg.cond(s_f))))
    assert "kid" not in q and "precision" not in q and "statistics only" in q["unavailable"]
    lines = format_measures(q).splitlines()
    assert lines[0].startswith("samples: 60 (reference: statistics only")
    assert lines[2].startswith("KID, precision, recall: unavailable (")


@pytest.mark.parametrize("arrays, words", [
    (dict(mu=np.zeros((D, 1)), sigma=np.eye(D)), "mu must be [D] and sigma [D x D]"),
    (dict(mu=np.zeros(D), sigma=np.eye(D + 1)), "mu must be [D] and sigma [D x D]"),
    (dict(mu=np.zeros(D + 1), sigma=np.eye(D + 1)), f"mu/sigma are {D + 1} wide, the feature extractor gives {D}"),
    (dict(mu=np.full(D, np.nan), sigma=np.eye(D)), f"{D} non-finite value(s)"),
    (dict(mu=np.zeros(D), sigma=np.triu(np.ones((D, D)))), "sigma is not symmetric"),
    (dict(mu=np.zeros(D, complex), sigma=np.eye(D)), "mu must be real numbers"),
    (dict(mu=np.zeros(D)), "holds mu but no sigma"),
    (dict(sigma=np.eye(D)), "holds sigma but no mu"),
    (dict(arr_0=None, labels=np.zeros(3)), "neither images in arr_0 nor mu/sigma (keys: labels)"),
    (dict(arr_0=np.zeros((4, *SHAPE)), mu=np.zeros(D), sigma=np.eye(D)), "arr_0 must be NHWC uint8"),
], ids=["mu-2d", "sigma-shape", "width", "nan", "asymmetric", "complex", "no-sigma", "no-mu", "neither",
        "float-images"])
def test_malformed_statistics_are_one_line(tmp_path, arrays, words):
    """Each beside the images in arr_0 (arr_0=None: without them)."""
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in ({"arr_0": images(10)} | arrays).items() if v is not None})
    with pytest.raises(ReferenceError) as e:
        reference_from(str(tmp_path / "bad.npz"), LinearFeatures())
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- the Inception Score ----------------------------------------------------------------------

def test_inception_score_on_known_cases():
    # Uniform predictions: p(y|x) = p(y), KL 0, IS 1 (float64 rounding of K-term sums).
    assert inception_score_from_probabilities(np.full((100, K), 1 / K)) == pytest.approx((1.0, 0.0), abs=10 * K * EPS)
    assert inception_score(np.zeros((100, 1008))) == pytest.approx((1.0, 0.0), abs=10 * 1008 * EPS)
    # Confident predictions spread evenly over K classes within every split: IS = exp(H(p(y))) = K.
    one_hot = np.tile(np.eye(K), (10 * 3, 1))  # 150 rows, each split of 15 holds every class 3 times
    assert inception_score_from_probabilities(one_hot) == pytest.approx((K, 0.0), abs=10 * K * K * EPS)
    # As logits: a margin of 50 leaves the other classes exp(-50) ~ 2e-22, far below float64's rounding of K.
    assert inception_score(50.0 * one_hot) == pytest.approx((K, 0.0), rel=1e-12)
    # Every prediction the same class: IS 1 (the mode-collapse floor).
    assert inception_score_from_probabilities(np.tile(np.eye(K)[:1], (50, 1)))[0] == pytest.approx(1.0, abs=1e-12)
    for bad, words in ((np.ones((5, K)) / K, "N >= splits"), (np.ones((20, K)), "rows that sum to 1")):
        with pytest.raises(ValueError, match=words):
            inception_score_from_probabilities(bad)


def numpy_inception_score(logits, splits):
    """Salimans et al.'s definition in plain numpy: per consecutive split, exp(mean_x KL(p(y|x) || p(y)))."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(p)
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        scores.append(np.exp((part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()))
    return np.mean(scores), np.std(scores)


def test_inception_score_equals_numpy_and_torchmetrics():
    logits = np.random.default_rng(11).normal(scale=3.0, size=(200, 1008))
    mean, std = inception_score(logits)
    np.testing.assert_allclose((mean, std), numpy_inception_score(logits, 10), rtol=1e-10)
    # torchmetrics' InceptionScore shuffles with the global RNG before splitting; the same permutation,
    # drawn from the same seed, applied to ours gives its mean (its std is the sample std: ddof 1).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=Precomputed(1008), splits=10)
    metric.update(torch.from_numpy(logits))
    torch.manual_seed(5)
    tm_mean, tm_std = metric.compute()
    torch.manual_seed(5)
    perm = torch.randperm(len(logits)).numpy()
    mean, std = inception_score(logits[perm])
    assert mean == pytest.approx(float(tm_mean), rel=1e-10)
    assert std * np.sqrt(10 / 9) == pytest.approx(float(tm_std), rel=1e-8)


def test_sample_quality_adds_the_inception_score_when_the_extractor_gives_logits(tmp_path):
    ext = LinearFeaturesAndLogits()
    ref = reference_from_images(tmp_path, images(12), ext)
    samples = images(13)
    m = sample_quality(ref, ext, None, samples, None, kid_subset_size=20)
    assert (m["inception_score"], m["inception_score_std"]) == inception_score(ext.features_and_logits(samples)[1])
    assert format_measures(m).splitlines()[-1].startswith(f"Inception Score: {m['inception_score']:.4f} +- ")
    assert "inception_score" not in sample_quality(ref, LinearFeatures(), None, samples, None, kid_subset_size=20)
    few = sample_quality(ref, ext, None, samples[:5], None, kid_subset_size=5)
    assert "at least 10 samples" in format_measures(few).splitlines()[-1]


# --- the Inception weights --------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty torch.hub cache in tmp_path: where the weights would be downloaded."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints" / fid.INCEPTION_FILE


def one_line(reason):
    assert reason and "\n" not in reason and "Traceback" not in reason, reason
    return reason


def test_local_weights_file_and_cache_without_download(tmp_path, cache, monkeypatch):
    local = tmp_path / "inception.pth"
    local.write_bytes(b"weights")
    assert ensure_inception_weights(str(local)) == (str(local), None)
    path, reason = ensure_inception_weights(str(tmp_path / "missing.pth"), download=True)
    assert path is None and one_line(reason).startswith("Inception weights not found: ")

    def no_network(*a, **k):
        raise AssertionError("the network was used without the opt-in")

    monkeypatch.setattr(socket, "create_connection", no_network)
    path, reason = ensure_inception_weights(None, download=False)
    assert path is None and "downloading them is not enabled" in one_line(reason) and str(cache) in reason
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"cached")
    assert ensure_inception_weights("", download=False) == (str(cache), None)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed: connection refused


def test_offline_download_is_one_line_and_leaves_nothing(cache, monkeypatch):
    logged, timeout_before = [], socket.getdefaulttimeout()
    start = time.perf_counter()
    path, reason = ensure_inception_weights(None, download=True, log=logged.append,
                                            url=f"http://127.0.0.1:{closed_port()}/{fid.INCEPTION_FILE}")
    assert path is None and one_line(reason).startswith("Inception weights could not be downloaded from http://")
    assert "URLError" in reason and str(cache) in reason and time.perf_counter() - start < fid.DOWNLOAD_TIMEOUT_S
    assert logged[0].startswith("downloading the Inception weights from ") and not cache.exists()
    assert socket.getdefaulttimeout() == timeout_before

    def no_dns(*a, **k):  # the real URL, as a machine without a name server sees it
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    path, reason = ensure_inception_weights(None, download=True, log=logged.append)
    assert path is None and fid.INCEPTION_URL in one_line(reason) and "Name or service not known" in reason


@pytest.fixture
def server(tmp_path):
    """A local HTTP server for files in tmp_path/served."""
    (tmp_path / "served").mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path / "served"))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield tmp_path / "served", f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_download_lands_in_the_cache_and_a_foreign_file_is_refused(cache, server):
    served, base = server
    torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, served / "good.pth")
    torch.save({"weight": torch.zeros(3)}, served / "foreign.pth")
    path, reason = ensure_inception_weights(None, download=True, log=lambda s: None, url=f"{base}/foreign.pth")
    assert path is None and "not Inception-v3's weights" in one_line(reason) and not cache.exists()
    path, reason = ensure_inception_weights(None, download=True, log=lambda s: None, url=f"{base}/good.pth")
    assert (path, reason) == (str(cache), None) and cache.read_bytes() == (served / "good.pth").read_bytes()
    assert ensure_inception_weights(None, download=False) == (str(cache), None)  # cached: used from now on

