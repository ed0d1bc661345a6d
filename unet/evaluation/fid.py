"""
Where FID's features and reference images come from. Features: torch-fidelity's Inception
(the standard FID; an optional extra, since torch-fidelity needs torchvision and a weights file,
which ``ensure_inception_weights`` downloads only when asked) or any extractor with ``name``,
``image_shape`` and ``features`` (the digit judge). Reference: a statistics file of
``unet.evaluation.metrics``, a folder of images, or guided-diffusion's reference-batch ``.npz``
(images in ``arr_0``; in the official ``VIRTUAL_*`` batches also the pool3 statistics ``mu``/``sigma``
the papers' FIDs use, which FID then uses too).
"""

import contextlib
import os
import socket
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .conv_judge import ConvJudge
from .judge import DigitJudge
from .metrics import Reference, ReferenceError, check_features, check_statistics, fmt_shape, load_reference_file

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch-fidelity's URL_INCEPTION_V3 (feature_extractor_inceptionv3.py): the TF 2015-12-05 graph's weights in PyTorch.
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: an unreachable host fails in this, not in minutes
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def inception_weights_path(weights=None):
    """The weights file: the one given, else torch-fidelity's (and torchmetrics') cached file."""
    return weights or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def fid_unavailable_reason(weights: "str | None" = None, download: bool = False,
                           log: Callable[[str], object] = print) -> "str | None":
    """None when torch-fidelity and its Inception weights are present (fetched first if ``download``
    and missing: ``ensure_inception_weights``), else why not (one line)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return ("Inception FID unavailable: torch-fidelity is not installed (pip install -e '.[fid]'; it needs "
                "torchvision); digit samples are measured in the digit judge's features instead (--features judge)")
    _, why = ensure_inception_weights(weights, download, log)
    if why:
        return (f"Inception FID unavailable: {why} (--download_inception / fid_download_inception; "
                "--inception_weights / fid_inception_weights)")
    return None


@contextlib.contextmanager
def _socket_timeout(seconds):
    """torch.hub's download opens its connection with the default socket timeout (none: a silent
    network can hang it for minutes); set one for the download and restore it after."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _check_inception_state(path):
    """Refuse a downloaded file that is not Inception-v3's state dict (its fc maps 2048 to 1008 classes)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048):
        raise ValueError("the downloaded file is not Inception-v3's weights (no fc.weight of 1008 x 2048)")


def ensure_inception_weights(weights: "str | None" = None, download: bool = False, log: Callable[[str], object] = print,
                             url: str = INCEPTION_URL, timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple:
    """
    The Inception weights file, fetched on first use only when opted in: the file given, else the
    cache (``inception_weights_path()``, where torch-fidelity and torchmetrics look too), else a
    download into the cache by ``torch.hub.download_url_to_file`` when ``download`` is true.

    :param weights: a local weights file, or None / "" for the cache.
    :param download: whether a missing cached file may be downloaded from ``url``.
    :param log: where the one line announcing a download goes.
    :return: (path, None) when the file is there, else (None, one line saying why and what to do).
    """
    if weights:
        return (weights, None) if os.path.isfile(weights) else (None, f"Inception weights not found: {weights}")
    path = inception_weights_path()
    if os.path.isfile(path):
        return path, None
    if not download:
        return None, (f"Inception weights are not at {path} and downloading them is not enabled; enable it, "
                      f"copy {INCEPTION_FILE} there, or give the file's path")
    log(f"downloading the Inception weights from {url} to {path}")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _socket_timeout(timeout):
            # The name's 6726825d is not checked as a sha256 prefix: torch-fidelity and pytorch-fid do not
            # check it either, and it is unverified here. The file is checked by loading it instead.
            torch.hub.download_url_to_file(url, path, progress=False)
        _check_inception_state(path)
    except Exception as e:  # offline (URLError, gaierror, timeout), HTTP errors, a foreign file
        if os.path.isfile(path):
            os.remove(path)
        first = str(e).splitlines()[0] if str(e) else ""
        return None, (f"Inception weights could not be downloaded from {url} ({type(e).__name__}: {first}); "
                      f"copy {INCEPTION_FILE} to {path} or give the file's path")
    return path, None


class InceptionFeatures:
    """torch-fidelity's Inception-v3 pool features (2048), FID's standard feature space.

    :param weights: the weights file (default: torch-fidelity's cache path).
    :param image_shape: (H, W, C) of the images it will be given (Inception resizes them itself).
    """

    def __init__(self, image_shape, weights=None, device="cpu", batch_size=100, download=False):
        reason = fid_unavailable_reason(weights, download)
        if reason:
            raise ReferenceError(reason)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=inception_weights_path(weights))
        self.net = self.net.to(device).eval()
        self.device, self.batch_size, self.image_shape = device, batch_size, tuple(image_shape)
        self.name = "inception-v3-compat-2048"

    @torch.no_grad()
    def features_and_logits(self, images: np.ndarray) -> tuple:
        """NHWC uint8 images (grey ones repeated to RGB) -> ([N x 2048] pool3 features, [N x 1008]
        ``logits_unbiased``: pool3 times the softmax weights without the bias, what the original
        Inception Score code and guided-diffusion's evaluator score), both float64, in one pass."""
        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).permute(0, 3, 1, 2)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            f, logit = self.net(x.to(self.device))
            feats.append(f.double().cpu())
            logits.append(logit.double().cpu())
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()

    def features(self, images: np.ndarray) -> np.ndarray:
        """NHWC uint8 images (grey ones repeated to RGB) -> [N x 2048] float64."""
        return self.features_and_logits(images)[0]


def folder_images(folder: str, channels: int) -> np.ndarray:
    """Every image file under ``folder`` as NHWC uint8 with ``channels`` channels; all must share
    one size (a reference is not resized: its size is part of what it measures)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ReferenceError(f"reference folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as img:
                arrays.append(np.asarray(img.convert("L" if channels == 1 else "RGB")).reshape(*img.size[::-1], -1))
        except (OSError, UnidentifiedImageError):
            raise ReferenceError(f"reference image {f} cannot be read") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ReferenceError(f"reference folder {folder} mixes image sizes {sorted(fmt_shape(s) for s in shapes)}")
    return np.stack(arrays)


def _batch_images(images, path):
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ReferenceError(f"{path}: arr_0 must be NHWC uint8 images, got {images.dtype} {images.shape}")
    return images


def reference_batch(path: str) -> tuple:
    """
    guided-diffusion's reference batch (and ``sample.py``'s ``samples.npz``): NHWC uint8 images in
    ``arr_0`` and, in the official ``VIRTUAL_*`` batches, Inception pool3 statistics ``mu``/``sigma``
    (sometimes the spatial ``mu_s``/``sigma_s`` of sFID too, which nothing here computes).

    :return: (images or None, (mu, sigma) unchecked or None, whether ``mu_s``/``sigma_s`` are there).
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            arrays = {k: f[k] for k in ("arr_0", "mu", "sigma") if k in keys}
    except Exception as e:  # truncated, not an .npz: BadZipFile, zlib.error, EOFError, ...
        raise ReferenceError(f"cannot read reference {path} (expected statistics from 'evaluate.py ref' or "
                             f"images in arr_0): {str(e).splitlines()[0] if str(e) else e!r}") from None
    if ("mu" in arrays) != ("sigma" in arrays):
        have, lack = ("mu", "sigma") if "mu" in arrays else ("sigma", "mu")
        raise ReferenceError(f"{path}: holds {have} but no {lack}; FID's statistics need both")
    if "arr_0" not in arrays and "mu" not in arrays:
        raise ReferenceError(f"cannot read reference {path}: it holds neither images in arr_0 nor mu/sigma "
                             f"(keys: {', '.join(sorted(keys)) or 'none'})")
    images = _batch_images(arrays["arr_0"], path) if "arr_0" in arrays else None
    statistics = (arrays["mu"], arrays["sigma"]) if "mu" in arrays else None
    return images, statistics, {"mu_s", "sigma_s"} <= keys


def _batch_line(path, images, statistics, spatial):
    """What a reference batch gave, in words: where FID's statistics and the features come from."""
    if statistics is None:
        return f"a reference batch of images in arr_0 ({path})"
    sfid = "; its mu_s/sigma_s (sFID) are not used" if spatial else ""
    if images is None:
        return (f"a reference batch's precomputed mu/sigma ({path}; no images, so no KID or precision/recall"
                f"{sfid})")
    return (f"a reference batch with precomputed mu/sigma ({path}: FID from mu/sigma, KID and precision/recall "
            f"from the features of its images{sfid})")


def reference_from(path: str, extractor: "InceptionFeatures | DigitJudge | ConvJudge",
                   allow_statistics_only: bool = False) -> tuple[Reference, str]:
    """
    A ``Reference`` in ``extractor``'s features from a statistics file, a folder of images or
    a reference batch (images in ``arr_0``, and precomputed ``mu``/``sigma`` that FID then uses),
    checked against the extractor, its width and its image shape.

    :param allow_statistics_only: accept a batch of ``mu``/``sigma`` without images (its reference
        has no features: no KID or precision/recall, and its image shape is unknown).
    :return: (reference, one line saying which kind of reference was read).
    """
    if not os.path.exists(path):
        raise ReferenceError(f"reference not found: {path}")
    # The extractor's width, from one blank image: checked before the first measurement.
    width = extractor.features(np.zeros((2, *extractor.image_shape), np.uint8)).shape[1]
    ref, images, statistics = None, None, None
    if os.path.isdir(path):
        kind = f"a folder of images ({path})"
        images = folder_images(path, extractor.image_shape[-1])
    else:
        ref = load_reference_file(path)
        kind = f"reference statistics ({path})"
        if ref is None:
            images, statistics, spatial = reference_batch(path)
            kind = _batch_line(path, images, statistics, spatial)
            if statistics is not None:
                statistics = check_statistics(*statistics, path, width)
            if images is None and not allow_statistics_only:
                raise ReferenceError(f"{path}: mu/sigma without images in arr_0: KID and precision/recall need "
                                     "the images, and their shape cannot be checked")
    if ref is None and images is None:
        ref = Reference(extractor.name, None, None, source=path, statistics=statistics)
        return ref, f"reference: {kind}, {len(statistics[0])}-dimensional statistics"
    if ref is None:
        # The shape is checked before the extractor sees the images (it cannot read another size).
        Reference(extractor.name, tuple(images.shape[1:]), np.zeros((0, 1)), source=path).check(
            extractor.name, extractor.image_shape, path)
        ref = Reference(extractor.name, tuple(images.shape[1:]), extractor.features(images), source=path,
                        statistics=statistics)
    ref.check(extractor.name, extractor.image_shape, path)
    ref.features = check_features(ref.features, path, width)
    return ref, f"reference: {kind}, {len(ref.features)} images of {fmt_shape(ref.image_shape)}"
