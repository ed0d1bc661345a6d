"""
Where FID's features and reference images come from. Features: torch-fidelity's Inception
(the standard FID; an optional extra, since torch-fidelity needs torchvision and a weights file,
and nothing here downloads) or any extractor with ``name``, ``image_shape`` and ``features``
(the digit judge). Reference: a statistics file of ``unet.evaluation.metrics``, a folder of
images, or guided-diffusion's reference-batch ``.npz`` (images in ``arr_0``).
"""

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .metrics import Reference, ReferenceError, check_features, fmt_shape, load_reference_file

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def inception_weights_path(weights=None):
    """The weights file: the one given, else torch-fidelity's (and torchmetrics') cached file."""
    return weights or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def fid_unavailable_reason(weights=None):
    """None when torch-fidelity and its Inception weights are present, else why not (one line)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return ("Inception FID unavailable: torch-fidelity is not installed (pip install -e '.[fid]'; it needs "
                "torchvision); digit samples are measured in the digit judge's features instead (--features judge)")
    path = inception_weights_path(weights)
    if not os.path.isfile(path):
        return (f"Inception FID unavailable: its weights are not at {path} and nothing is downloaded here; copy "
                f"{INCEPTION_FILE} there or give its path (--inception_weights / fid_inception_weights)")
    return None


class InceptionFeatures:
    """torch-fidelity's Inception-v3 pool features (2048), FID's standard feature space.

    :param weights: the weights file (default: torch-fidelity's cache path).
    :param image_shape: (H, W, C) of the images it will be given (Inception resizes them itself).
    """

    def __init__(self, image_shape, weights=None, device="cpu", batch_size=100):
        reason = fid_unavailable_reason(weights)
        if reason:
            raise ReferenceError(reason)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=inception_weights_path(weights))
        self.net = self.net.to(device).eval()
        self.device, self.batch_size, self.image_shape = device, batch_size, tuple(image_shape)
        self.name = "inception-v3-compat-2048"

    @torch.no_grad()
    def features(self, images):
        """NHWC uint8 images (grey ones repeated to RGB) -> [N x 2048] float64."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).permute(0, 3, 1, 2)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            out.append(self.net(x.to(self.device))[0].double().cpu())
        return torch.cat(out).numpy()


def folder_images(folder, channels):
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


def npz_images(path):
    """guided-diffusion's reference batch (and ``sample.py``'s ``samples.npz``): NHWC uint8 in ``arr_0``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            images = f["arr_0"]
    except Exception as e:  # truncated, not an .npz, no arr_0: BadZipFile, zlib.error, EOFError, ...
        raise ReferenceError(f"cannot read reference {path} (expected statistics from 'evaluate.py ref' or "
                             f"images in arr_0): {str(e).splitlines()[0] if str(e) else e!r}") from None
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ReferenceError(f"{path}: arr_0 must be NHWC uint8 images, got {images.dtype} {images.shape}")
    return images


def reference_from(path, extractor):
    """
    A ``Reference`` in ``extractor``'s features from a statistics file, a folder of images or
    an ``arr_0`` image batch, checked against the extractor and its image shape.

    :return: (reference, one line saying which kind of reference was read).
    """
    if not os.path.exists(path):
        raise ReferenceError(f"reference not found: {path}")
    if os.path.isdir(path):
        ref, kind = None, f"a folder of images ({path})"
        images = folder_images(path, extractor.image_shape[-1])
    else:
        ref = load_reference_file(path)
        kind = f"reference statistics ({path})" if ref else f"a reference batch of images in arr_0 ({path})"
        images = None if ref else npz_images(path)
    if ref is None:
        # The shape is checked before the extractor sees the images (it cannot read another size).
        Reference(extractor.name, tuple(images.shape[1:]), np.zeros((0, 1)), source=path).check(
            extractor.name, extractor.image_shape, path)
        ref = Reference(extractor.name, tuple(images.shape[1:]), extractor.features(images), source=path)
    ref.check(extractor.name, extractor.image_shape, path)
    # Width and finiteness before the first measurement: the extractor's width, from one blank image.
    width = extractor.features(np.zeros((2, *extractor.image_shape), np.uint8)).shape[1]
    ref.features = check_features(ref.features, path, width)
    return ref, f"reference: {kind}, {len(ref.features)} images of {fmt_shape(ref.image_shape)}"
