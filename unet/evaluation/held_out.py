"""
Held-out measures of a trained model: bits/dim (the full variational bound) and the training
objective over many seeded draws of t and noise, on the held-out split the training loop
made; and the paired report that compares checkpoints on the same images and noise.
``unet.evaluation.evaluate``'s ``bpd`` and ``loss`` commands print them.
"""

from collections.abc import Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from scipy import stats
from tqdm.auto import tqdm

from unet.core.diffusion import GaussianDiffusion
from unet.core.model import UNetModel
from unet.sample.sampling import sample_generators
from unet.utils.stats import t_interval


@torch.no_grad()
def bits_per_dim(model: UNetModel, diffusion: GaussianDiffusion, images: torch.Tensor,
                 labels: "torch.Tensor | None" = None, batch_size: int = 64, seed: int = 0,
                 accelerator: "Accelerator | None" = None, progress: bool = True) -> np.ndarray:
    """
    The variational bound in bits/dim of each held-out image (``calc_bpd_loop``, all T
    terms), batched and split across processes; noise is drawn per image index, so the
    result does not depend on the batching or the number of processes.

    :param images: [N x C x H x W] floats in [-1, 1].
    :param labels: [N] labels for a class-conditional model.
    :return: [N] numpy array of total bits/dim, in image order, on every process.
    """
    device = accelerator.device if accelerator else torch.device("cpu")
    indices = list(range(len(images)))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices) as mine:
            indices = list(mine)
    is_main = accelerator.is_main_process if accelerator else True
    results = []
    for start in tqdm(range(0, len(indices), batch_size), desc="bits/dim", disable=not (progress and is_main)):
        batch = indices[start:start + batch_size]
        x = images[batch].to(device)
        gens = sample_generators(seed, batch)
        shape = x.shape[1:]

        def noise_fn(_step, gens=gens, shape=shape):  # per image, from its own generator
            return torch.cat([torch.randn(1, *shape, generator=g) for g in gens]).to(device)

        kwargs = {} if labels is None or model.num_classes is None else {"y": labels[batch].to(device)}
        out = diffusion.calc_bpd_loop(model, x, clip_denoised=True, model_kwargs=kwargs, noise_fn=noise_fn)
        results += list(zip(batch, out["total_bpd"].cpu().tolist()))
    if accelerator is not None and accelerator.num_processes > 1:
        results = gather_object(results)
    results.sort()
    return np.array([r[1] for r in results])


@torch.no_grad()
def held_out_losses(model: UNetModel, diffusion: GaussianDiffusion, images: torch.Tensor,
                    labels: "torch.Tensor | None" = None, draws: int = 16, seed: int = 0,
                    batch_size: int = 256) -> dict[str, np.ndarray]:
    """
    The training objective on held-out images: ``draws`` passes over all of them, each with
    its own t and noise per image from one seeded generator, so that every model evaluated
    with the same ``seed`` sees the same (image, t, noise) triples and can be compared pass
    by pass. The training loop's ``eval/loss`` is one such pass over a fixed 256-image batch
    with the raw weights: noisier, since each image has one t.

    :return: {term: [draws] numpy array of the pass's mean} for ``loss`` and, where the
        objective has them, ``mse`` and ``vb``.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    passes = {}
    for _ in range(draws):
        t = torch.randint(0, diffusion.num_timesteps, (len(images),), generator=gen)
        noise = torch.randn(images.shape, generator=gen)
        sums = {}
        for i in range(0, len(images), batch_size):
            sl = slice(i, i + batch_size)
            kwargs = {} if labels is None or model.num_classes is None else {"y": labels[sl].to(device)}
            terms = diffusion.training_losses(model, images[sl].to(device), t[sl].to(device), kwargs,
                                              noise[sl].to(device))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.double().sum().item()
        for k, v in sums.items():
            passes.setdefault(k, []).append(v / len(images))
    return {k: np.array(v) for k, v in passes.items()}


def paired_report(names: Sequence[str], values: Sequence[np.ndarray], what: str, unit: str) -> list[str]:
    """Lines: each checkpoint's mean +- standard error, then each one's difference from the
    first, paired by ``unit`` (same images, t and noise), with its 95% t half-width."""
    lines = []
    for name, v in zip(names, values):
        sem = stats.sem(v) if len(v) > 1 else float("nan")
        lines.append(f"{what} of {name}: {v.mean():.4f} +- {sem:.4f} (standard error over {len(v)} {unit})")
    for name, v in zip(names[1:], values[1:]):
        mean, half = t_interval(v - values[0])
        lines.append(f"  {name} minus {names[0]}: {mean:+.4f} +- {half:.4f} (95% t half-width, paired by {unit[:-1]})")
    return lines

