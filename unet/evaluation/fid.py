"""FID of RGB samples against a folder of real images, by torch-fidelity's Inception (an
optional extra: torch-fidelity needs torchvision and downloaded weights)."""

import os
import tempfile

import torch

from unet.utils.images import to_pil

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def fid_unavailable_reason(weights=None):
    """None when torch-fidelity and its Inception weights are present, else why not (one line)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return "FID skipped: torch-fidelity is not installed (pip install torch-fidelity; it needs torchvision)"
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if not os.path.isfile(path):
        return (f"FID skipped: torch-fidelity's Inception weights are not at {path} and this machine has no "
                f"network to fetch them; copy {INCEPTION_FILE} there or pass --inception_weights")
    return None


def fid(images, ref_dir, weights=None):
    """FID of NHWC uint8 ``images`` against the images in ``ref_dir``, by torch-fidelity.
    :return: (fid or None, one-line reason when None)."""
    reason = fid_unavailable_reason(weights)
    if reason:
        return None, reason
    import torch_fidelity

    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(images):
            to_pil(img).convert("RGB").save(os.path.join(tmp, f"{i:06d}.png"))
        kwargs = {"feature_extractor_weights_path": weights} if weights else {}
        metrics = torch_fidelity.calculate_metrics(input1=tmp, input2=ref_dir, fid=True, verbose=False, **kwargs)
    return float(metrics["frechet_inception_distance"]), None
