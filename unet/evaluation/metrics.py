"""
Sample quality from features, the way the papers measure it: FID (Heusel et al. 2017), KID
(Binkowski et al. 2018, its subset estimator) and precision/recall (Kynkaanniemi et al. 2019,
k = 3), between a set of generated images and reference statistics kept in a file, and the
Inception Score (Salimans et al. 2016) of the generated images' class predictions.

FID and KID are torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``,
fed features that an extractor (the digit judge's hidden layer, or Inception) has already
computed: the metric's feature module is the identity. ``frechet_distance`` is the package's
one Frechet implementation on feature sets; the digit judge's distance goes through it too.
A reference that carries precomputed statistics (guided-diffusion's reference batches: the
papers' ``mu``/``sigma``) is measured with ``frechet_distance_from_statistics`` instead, the
formula of guided-diffusion's evaluator (scipy's matrix square root).

A ``Reference`` is the real images' features with their mean and covariance, keyed by the
extractor that made them (``extractor``) and the image shape it read: a file made with
another extractor or for other images is refused, not silently compared.
"""

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

PR_NEIGHBOURS = 3  # Kynkaanniemi et al.'s k: the k-th nearest neighbour sets each manifold ball
KID_SUBSETS = 100  # the subset count of the KID paper and of torchmetrics' default
REFERENCE_FORMAT = 1  # bumped when the file's keys change


class ReferenceError(ValueError):
    """A reference that cannot be used here; the message is the one line the user sees."""


class Precomputed(torch.nn.Module):
    """The feature module torchmetrics calls: the identity on features already extracted."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x):
        return x


@dataclass
class Reference:
    """
    Real images' features and their statistics.

    :param extractor: the feature extractor's key (``name`` of a judge or Inception extractor).
    :param image_shape: (H, W, C) of the images the features were computed from (None: unknown,
        statistics without their images).
    :param features: [N x D] float64, or None when only statistics are known.
    :param source: where it came from, for the one line that says what was read.
    :param statistics: precomputed (mu [D], sigma [D x D]) that FID uses instead of the features'
        (a reference batch's ``mu``/``sigma``); None: FID fits the features.
    """

    extractor: str
    image_shape: tuple
    features: "np.ndarray | None"
    source: str = ""
    statistics: "tuple | None" = None

    @property
    def mu(self):
        return self.features.mean(0) if self.statistics is None else self.statistics[0]

    @property
    def sigma(self):
        return np.cov(self.features, rowvar=False) if self.statistics is None else self.statistics[1]

    @property
    def fid_source(self) -> str:
        """What FID is computed from, in words (the line ``format_measures`` prints)."""
        if self.statistics is not None:
            return "the batch's precomputed mu/sigma"
        return f"features computed from {len(self.features)} images"

    def check(self, extractor, image_shape, where):
        """Refuse, in one line, statistics of another extractor or image shape."""
        if self.extractor != extractor:
            raise ReferenceError(f"{where}: reference statistics were computed with feature extractor "
                                 f"'{self.extractor}', these samples are measured with '{extractor}'; recompute "
                                 f"them with 'evaluate.py ref'")
        if self.image_shape is not None and tuple(self.image_shape) != tuple(image_shape):
            raise ReferenceError(f"{where}: reference images are {fmt_shape(self.image_shape)}, the samples "
                                 f"{fmt_shape(image_shape)} (height x width x channels)")


def fmt_shape(shape):
    return "x".join(str(int(s)) for s in shape)


def save_reference(path: str, ref: Reference) -> None:
    """Write ``ref`` as an ``.npz``: features, their mean and covariance, the extractor's key."""
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, format=REFERENCE_FORMAT, extractor=ref.extractor, image_shape=np.asarray(ref.image_shape),
             features=ref.features, mu=ref.mu, sigma=ref.sigma)
    os.replace(tmp, path)  # whole or not at all


def check_features(features: np.ndarray, where: str, width: "int | None" = None) -> np.ndarray:
    """Refuse, in one line, reference features that are not an [N x D] finite numeric array with
    N >= 2 (and D == ``width`` when given): a NaN there crashes torchmetrics' covariance (a
    segfault inside MKL, seen), a wrong width fails only at the first measurement."""
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[0] < 2 or not np.issubdtype(f.dtype, np.number) or np.iscomplexobj(f):
        raise ReferenceError(f"{where}: reference features must be a real [N x D] array with N >= 2, got "
                             f"{f.dtype} {f.shape}")
    if width is not None and f.shape[1] != width:
        raise ReferenceError(f"{where}: reference features are {f.shape[1]} wide, the feature extractor gives "
                             f"{width}; recompute them with 'evaluate.py ref'")
    if not np.isfinite(f).all():
        raise ReferenceError(f"{where}: reference features hold {int((~np.isfinite(f)).sum())} non-finite "
                             "value(s) (NaN or inf); recompute them with 'evaluate.py ref'")
    return f.astype(np.float64)


def check_statistics(mu, sigma, where: str, width: "int | None" = None) -> tuple:
    """Refuse, in one line, precomputed statistics that are not a finite real mean [D] and a
    symmetric covariance [D x D] (with D == ``width`` when given); return them as float64."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
            raise ReferenceError(f"{where}: {name} must be real numbers, got {a.dtype}")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ReferenceError(f"{where}: mu must be [D] and sigma [D x D] with the same D, got mu {mu.shape} and "
                             f"sigma {sigma.shape}")
    if width is not None and len(mu) != width:
        raise ReferenceError(f"{where}: mu/sigma are {len(mu)} wide, the feature extractor gives {width} "
                             f"(Inception's pool3 gives 2048): statistics of another feature space")
    bad = int((~np.isfinite(mu)).sum() + (~np.isfinite(sigma)).sum())
    if bad:
        raise ReferenceError(f"{where}: mu/sigma hold {bad} non-finite value(s) (NaN or inf)")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if np.abs(sigma - sigma.T).max() > 1e-6 * max(np.abs(sigma).max(), 1e-300):
        raise ReferenceError(f"{where}: sigma is not symmetric, so not a covariance")
    return mu, sigma


def load_reference_file(path):
    """A file ``save_reference`` wrote, checked (``check_features``), or None when ``path`` is an
    ``.npz`` of another layout; anything unreadable (truncated, not an ``.npz``) is one line."""
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ReferenceError(f"{path}: not an .npz archive (a bare array of {f.dtype} {f.shape}); give "
                                 "statistics from 'evaluate.py ref' or images in arr_0")
        with f:
            if "extractor" not in f:
                return None
            if int(f["format"]) != REFERENCE_FORMAT:
                raise ReferenceError(f"{path}: reference format {int(f['format'])}, this version reads "
                                     f"{REFERENCE_FORMAT}; recompute it with 'evaluate.py ref'")
            return Reference(str(f["extractor"]), tuple(int(s) for s in f["image_shape"]),
                             check_features(f["features"], path), source=f"reference statistics {path}")
    except ReferenceError:
        raise
    except Exception as e:  # truncated or foreign: BadZipFile, zlib.error, EOFError, ValueError, KeyError
        raise ReferenceError(f"cannot read reference {path}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else e!r}") from None


# --- the measures ---------------------------------------------------------------------------

# Every caller gives whole feature sets (the samples are gathered first), so the metrics must not
# sum states across processes: that would count each sample once per process, and hang where
# only the main process computes.
NO_SYNC = dict(sync_on_compute=False)


def _fid_metric(dim):
    return FrechetInceptionDistance(feature=Precomputed(dim), reset_real_features=False, **NO_SYNC)


def frechet_distance(real, fake):
    """
    Frechet distance between Gaussians fitted to feature sets ``real`` and ``fake`` ([N x D]):
    |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) (FID's formula), by torchmetrics in float64.
    """
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"the Frechet distance fits a covariance: it needs at least 2 samples on each side, "
                         f"got {len(real)} and {len(fake)}")
    metric = _fid_metric(real.shape[1])
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    # Rounding can leave -1e-13 for identical sets; the distance itself is never negative.
    return max(float(metric.compute()), 0.0)


# Frechet distance of two Gaussians (Heusel et al. 2017, Eq. 6; Dowson & Landau 1982):
# |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), computed as guided-diffusion's evaluator
# (evaluations/evaluator.py, FIDStatistics.frechet_distance) does: scipy's sqrtm, and an eps
# offset on the diagonals when the product is singular enough to make it non-finite.
def frechet_distance_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                                     eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # The product of two covariances has real eigenvalues >= 0: a small imaginary part is rounding.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the Frechet distance's matrix square root has an imaginary part of "
                             f"{np.abs(covmean.imag).max():.3g}: are sigma1 and sigma2 covariances?")
        covmean = covmean.real
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)), 0.0)


IS_SPLITS = 10  # the Inception Score's split count in Salimans et al.'s code and guided-diffusion's evaluator


# Inception Score (Salimans et al. 2016, Sec. 4): exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction.
# As their code (openai/improved-gan, inception_score.py) and guided-diffusion's evaluator: the N
# predictions are cut in order into ``splits`` parts, each part scored with its own p(y); mean and
# (population) standard deviation over the parts.
def inception_score_from_probabilities(probabilities: np.ndarray, splits: int = IS_SPLITS) -> tuple:
    """The Inception Score of class probabilities ([N x K], rows summing to 1): (mean, std) over splits."""
    p = torch.as_tensor(np.asarray(probabilities), dtype=torch.float64)
    if p.ndim != 2 or len(p) < splits or splits < 1:
        raise ValueError(f"the Inception Score needs [N x K] predictions with N >= splits ({splits}), got "
                         f"{tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any() or (p.sum(1) - 1).abs().max() > 1e-6:
        raise ValueError("the Inception Score needs probabilities: finite, non-negative rows that sum to 1")
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(1).mean()  # 0 log 0 = 0
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple:
    """The Inception Score of class logits ([N x K]; Inception's ``logits_unbiased``, the pool3-to-softmax
    product without the bias, as the original code): (mean, std) over ``splits`` parts."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if x.ndim != 2 or not torch.isfinite(x).all():
        raise ValueError(f"the Inception Score needs finite [N x K] logits, got shape {tuple(x.shape)}")
    return inception_score_from_probabilities(x.softmax(1).numpy(), splits)


def kernel_distance(real, fake, subset_size, subsets=KID_SUBSETS, seed=0):
    """
    KID: the unbiased MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3, averaged over
    ``subsets`` random subsets of ``subset_size`` from each side (torchmetrics'
    ``KernelInceptionDistance``). The subsets are drawn from a generator seeded by ``seed``.

    :return: (mean, standard deviation over the subsets).
    """
    n = min(len(real), len(fake))
    if not 2 <= subset_size <= n:
        raise ValueError(f"KID subset size {subset_size} must be between 2 and the smaller set's size ({n})")
    with warnings.catch_warnings():  # "will save all extracted features": what KID needs, said at every call
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets,
                                         subset_size=subset_size, **NO_SYNC)
    metric.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(fake, dtype=torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):  # its randperm reads the global RNG: seed it, leave training's alone
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(x, k, batch=1024):
    """Distance from each row of ``x`` to its k-th nearest other row."""
    out = []
    for i in range(0, len(x), batch):
        d = torch.cdist(x[i:i + batch], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the row itself is at distance 0
    return torch.cat(out)


def _inside_any_ball(points, centres, radii, batch=1024):
    """Whether each point lies within radius[j] of some centre j (the estimated manifold)."""
    out = []
    for i in range(0, len(points), batch):
        d = torch.cdist(points[i:i + batch], centres)
        out.append((d <= radii[None, :]).any(1))
    return torch.cat(out)


def precision_recall(real, fake, k=PR_NEIGHBOURS):
    """
    Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-3): each set's manifold is
    the union of balls around its points reaching their k-th nearest neighbour; precision is the
    fraction of generated points inside the real manifold, recall the fraction of real points
    inside the generated one.
    """
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points on each side")
    precision = _inside_any_ball(fake, real, _kth_neighbour_radii(real, k)).double().mean()
    recall = _inside_any_ball(real, fake, _kth_neighbour_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def quality(ref: Reference, fake: np.ndarray, kid_subset_size: int, seed: int = 0,
            logits: "np.ndarray | None" = None) -> dict:
    """
    FID, KID and precision/recall of feature set ``fake`` against ``ref`` (a ``Reference``), and
    the Inception Score of ``logits`` when given. FID uses the reference's precomputed statistics
    when it has them (``fid_source`` says which); KID and precision/recall need its features, so
    a statistics-only reference leaves them out and says why in ``unavailable``.

    :param kid_subset_size: KID's subset size (at most the smaller set's size).
    :param logits: the samples' class logits ([N x K], Inception's ``logits_unbiased``), or None.
    :return: dict with ``fid``, ``fid_source``, ``kid``, ``kid_std``, ``precision``, ``recall``, ``n``,
        ``n_ref``, ``kid_subset_size``, ``extractor`` (and ``inception_score``, ``inception_score_std``
        with logits; ``unavailable`` in place of the feature measures without reference features).
    """
    fake = np.asarray(fake, dtype=np.float64)
    if ref.statistics is None:
        fid = frechet_distance(ref.features, fake)
    elif len(fake) < 2:
        raise ValueError(f"the Frechet distance fits a covariance: it needs at least 2 samples, got {len(fake)}")
    else:
        fid = frechet_distance_from_statistics(ref.mu, ref.sigma, fake.mean(0), np.cov(fake, rowvar=False))
    out = dict(fid=fid, fid_source=ref.fid_source, n=len(fake),
               n_ref=None if ref.features is None else len(ref.features), extractor=ref.extractor)
    if ref.features is None:
        out["unavailable"] = ("KID and precision/recall need the reference's features; this reference holds "
                              "statistics only (no images in arr_0)")
    else:
        kid, kid_std = kernel_distance(ref.features, fake, kid_subset_size, seed=seed)
        precision, recall = precision_recall(ref.features, fake)
        out.update(kid=kid, kid_std=kid_std, precision=precision, recall=recall, kid_subset_size=kid_subset_size)
    if logits is not None and len(logits) >= IS_SPLITS:
        out["inception_score"], out["inception_score_std"] = inception_score(logits)
    elif logits is not None:
        out["inception_score_unavailable"] = f"it needs at least {IS_SPLITS} samples, one per split"
    return out


def format_measures(q: dict) -> str:
    """The lines ``evaluate.py fid`` prints."""
    n_ref = "statistics only" if q["n_ref"] is None else q["n_ref"]
    lines = [f"samples: {q['n']} (reference: {n_ref}, features: {q['extractor']})",
             f"FID: {q['fid']:.4f} (reference: {q.get('fid_source', 'its features')})"]
    if "kid" in q:
        lines += [f"KID: {q['kid']:.5f} +- {q['kid_std']:.5f} (std over {KID_SUBSETS} subsets of "
                  f"{q['kid_subset_size']})",
                  f"precision: {q['precision']:.4f}  recall: {q['recall']:.4f} (k={PR_NEIGHBOURS})"]
    else:
        lines.append(f"KID, precision, recall: unavailable ({q['unavailable']})")
    if "inception_score" in q:
        lines.append(f"Inception Score: {q['inception_score']:.4f} +- {q['inception_score_std']:.4f} "
                     f"(std over {IS_SPLITS} splits of {q['n']} samples)")
    elif "inception_score_unavailable" in q:
        lines.append(f"Inception Score: unavailable ({q['inception_score_unavailable']})")
    return "\n".join(lines)
