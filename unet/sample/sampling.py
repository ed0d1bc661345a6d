"""
Sampling a trained model with diffusers' schedulers: the schedulers, per-sample randomness
and the loop. Loading is ``unet.train.checkpoint``'s; the command line and the files it writes are
``sample.py``'s.

The model is ours; the update rules are diffusers': ``ddpm`` is improved-DDPM's ancestral
sampler (learned-range variance, respaced to any K by ``timestep_spacing="linspace"``, which
keeps the same steps as the original's ``space_timesteps(T, "K")``), ``ddim`` and
``dpm-solver++`` are the deterministic fast samplers. Randomness is drawn per sample index,
so a seed gives the same images whatever the batch size or the number of processes.

Classifier-free guidance (Ho & Salimans 2022) works with every scheduler: the model output
is replaced by ``guidance.guided_output`` of one batched pass over [cond; null labels],
the same rule the exported pipeline applies.
"""

import inspect
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from unet.checkpoint.load import Loaded
from unet.config import TrainConfig
from unet.core.diffusion import get_named_beta_schedule, linear_beta_range, scale_timesteps
from unet.core.model import UNetModel
from unet.utils.images import to_uint8

from .guidance import guided_output, scheduler_input

# improved-DDPM's ancestral sampler, then the diffusers schedulers that take this model's output as
# it is (epsilon, or x_0 with predict_xstart; the learned-variance channels sliced off) and can clip
# x_0: DDIM, the multistep solvers and the stochastic DPM-Solver++. diffusers' sigma samplers (Euler,
# Euler ancestral, Heun) cannot clip, and from the cosine schedule's last sigma (about 2e4) they gave
# noise on the digits model (docs/measurements/sampling.md), so they are not offered.
SCHEDULERS = ("ddpm", "ddim", "dpm-solver++", "dpm-solver++-sde", "unipc", "deis")
# The default, from the samplers' table in docs/sampling.md: on the digits model at 2,000 samples,
# DPM-Solver++ (SDE) at 20 steps drew the requested digit as often as ancestral DDPM (0.987 and 0.990
# on two seeds; DDPM: 0.988 at 1000 steps, 0.989 and 0.990 at 100) at 57 times the speed of DDPM at
# 1000 steps, where the deterministic solvers gave 0.965-0.975.
DEFAULT_SCHEDULER, DEFAULT_STEPS = "dpm-solver++-sde", 20


def default_steps(diffusion_kwargs: dict) -> int:
    """``DEFAULT_STEPS``, or every training step when there are fewer."""
    return min(DEFAULT_STEPS, diffusion_kwargs.get("steps", 1000))


# --- schedulers ----------------------------------------------------------------------

def beta_schedule_kwargs(noise_schedule, steps):
    """diffusers' name for improved-DDPM's beta schedule over ``steps`` training steps.
    The linear schedule is scaled by 1000/T so that any T spans the same noise range."""
    if noise_schedule == "cosine":
        return dict(beta_schedule="squaredcos_cap_v2")
    if noise_schedule == "linear":
        start, end = linear_beta_range(steps)
        return dict(beta_schedule="linear", beta_start=start, beta_end=end)
    raise ValueError(f"unknown noise_schedule {noise_schedule!r}; valid: 'linear', 'cosine'")


def scheduler_kwargs(diffusion_kwargs):
    """Constructor arguments shared by every scheduler, from ``create_diffusion``'s arguments."""
    steps = diffusion_kwargs.get("steps", 1000)
    return dict(num_train_timesteps=steps,
                **beta_schedule_kwargs(diffusion_kwargs.get("noise_schedule", "linear"), steps),
                prediction_type="sample" if diffusion_kwargs.get("predict_xstart") else "epsilon",
                timestep_spacing="linspace")


def ddpm_variance_type(diffusion_kwargs):
    """The DDPMScheduler variance matching the diffusion's. "learned_range" is Eq. 15's
    interpolation ("learned" would read the output as a variance, which ours is not)."""
    if diffusion_kwargs.get("learn_sigma"):
        return "learned_range"
    return "fixed_small" if diffusion_kwargs.get("sigma_small") else "fixed_large"


def make_scheduler(name, diffusion_kwargs):
    """
    A fresh diffusers scheduler for the diffusion described by ``diffusion_kwargs``.

    :param name: one of ``SCHEDULERS``.
    :param diffusion_kwargs: the ``create_diffusion`` arguments the model was trained with.
    """
    common = scheduler_kwargs(diffusion_kwargs)
    if name == "ddpm":
        sched = DDPMScheduler(**common, variance_type=ddpm_variance_type(diffusion_kwargs), clip_sample=True)
        return float64_schedule(sched, diffusion_kwargs)
    if name == "ddim":
        # set_alpha_to_one: the last step lands on alpha-bar = 1, as the original's DDIM does.
        return DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True)
    # x_0 is clipped to [-1, 1] wherever the scheduler can (thresholding with a maximum of 1 is a
    # plain clip); without it, our cosine-schedule digits model gives saturated noise with
    # DPM-Solver++ at 20 steps. No variance_type: with it set, diffusers' DPM-Solver keeps
    # channels [:, :3], wrong for 1- or 4-channel images; ``scheduler_input`` slices instead.
    clip = dict(thresholding=True, sample_max_value=1.0)
    if name in ("dpm-solver++", "dpm-solver++-sde"):
        # diffusers asks for lambda_min_clipped with the cosine schedule.
        cosine = diffusion_kwargs.get("noise_schedule") == "cosine"
        algorithm = "dpmsolver++" if name == "dpm-solver++" else "sde-dpmsolver++"
        return DPMSolverMultistepScheduler(**common, **clip, solver_order=2, algorithm_type=algorithm,
                                           lambda_min_clipped=-5.1 if cosine else -float("inf"))
    if name == "unipc":
        return UniPCMultistepScheduler(**common, **clip, solver_order=2)
    if name == "deis":
        return DEISMultistepScheduler(**common, **clip, solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")


def float64_schedule(scheduler, diffusion_kwargs):
    """Give a DDPMScheduler the float64 schedule improved-DDPM uses. In float32, 1 - alpha-bar
    near t = 0 keeps only about three digits, which moves the last steps' variance by up to
    3e-4; with float64 constants each step matches the core's to 1e-5 at every t. The betas
    are the same schedule diffusers built (a test checks), only more precise."""
    steps = diffusion_kwargs.get("steps", 1000)
    scheduler.betas = torch.from_numpy(get_named_beta_schedule(diffusion_kwargs.get("noise_schedule", "linear"), steps))
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def model_timesteps(t, diffusion_kwargs, batch_size):
    """The timesteps the model is called with at scheduler step ``t`` (an original-process
    index): scaled to [0, 1000) when the model was trained with ``rescale_timesteps``."""
    t = torch.full((batch_size,), int(t), dtype=torch.long)
    return scale_timesteps(t, diffusion_kwargs.get("steps", 1000), diffusion_kwargs.get("rescale_timesteps", False))


def check_steps(steps: int, diffusion_kwargs: dict) -> None:
    """Reject a step count the scheduler cannot take, in one line."""
    total = diffusion_kwargs.get("steps", 1000)
    if not 1 <= steps <= total:
        raise ValueError(f"--steps {steps} is out of range: this model was trained with {total} diffusion steps "
                         f"(give 1 to {total})")


def check_seed(seed: int) -> None:
    """Seeds are non-negative integers (numpy's SeedSequence takes no negative entropy)."""
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"--seed {seed} is out of range: give an integer from 0 to 2**63 - 1")


# --- classifier-free guidance --------------------------------------------------------

def null_class_label(cfg: "TrainConfig | None") -> "int | None":
    """The label meaning "no label" of a model trained with label dropout (``class_dropout_prob``
    > 0: the extra, last embedding, index ``num_classes``); None for any other model."""
    if cfg is None or not cfg.class_cond or not cfg.class_dropout_prob > 0:
        return None
    return cfg.num_classes


def real_class_count(model: UNetModel, null_label: "int | None") -> "int | None":
    """How many classes labels are drawn from: the model's embeddings but the null one."""
    return model.num_classes if null_label is None else null_label


def check_guidance(guidance_scale: float, num_classes: "int | None", null_label: "int | None") -> None:
    """
    Refuse a guidance scale the model cannot follow, in one line: a negative or non-finite
    one, or any scale but 1 for a model without an unconditional prediction (unconditional,
    or class-conditional trained without label dropout). Refusing, not warning: a run asked
    for guidance would otherwise give plain samples that look like a failed guidance.

    :param num_classes: the model's label embeddings (None: unconditional).
    """
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"--guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale}")
    if guidance_scale != 1 and null_label is None:
        what = "is unconditional" if num_classes is None else "was trained without label dropout (class_dropout_prob 0)"
        raise ValueError(f"--guidance_scale {guidance_scale:g} needs a model trained with class_dropout_prob > 0; "
                         f"this one {what}: use --guidance_scale 1")
    if null_label is not None and num_classes != null_label + 1:
        raise ValueError(f"null label {null_label} is not the last of the model's {num_classes} label embeddings")


def model_output(model, x, t, y=None, null_label=None, guidance_scale=1.0):
    """
    The model's output at (x, t): conditional (one pass) when ``guidance_scale`` is 1 or the
    model is unconditional; otherwise classifier-free guided, from one pass over the batch
    twice, with labels ``y`` and with ``null_label``.
    """
    if y is None:
        return model(x, t)
    if guidance_scale == 1:
        return model(x, t, y=y)
    both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = both.chunk(2)
    return guided_output(cond, uncond, guidance_scale, x.shape[1])


# --- randomness per sample -----------------------------------------------------------

def sample_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One generator per sample index, so that sample i's labels and noise depend only on
    (seed, i), not on how samples are batched or split across processes."""
    gens = []
    for i in indices:
        state = np.random.SeedSequence([seed, int(i)]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def device_generators(generators, device):
    """Generators on ``device`` seeded as ``generators`` (the same objects on the CPU), so that
    noise is drawn where the images are: on an accelerator each sample's noise still depends only
    on (seed, index), though its numbers differ from the CPU's."""
    device = torch.device(device)
    if device.type == "cpu":
        return generators
    return [torch.Generator(device=device).manual_seed(g.initial_seed()) for g in generators]


def draw_labels(indices, generators, num_classes, class_labels=None):
    """Labels for samples ``indices``: cycled from ``class_labels``, else uniformly at random
    from each sample's own generator. None for an unconditional model."""
    if num_classes is None:
        return None
    if class_labels:
        return torch.tensor([class_labels[i % len(class_labels)] for i in indices], dtype=torch.long)
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in generators])


# --- the loop ------------------------------------------------------------------------

@torch.no_grad()
def sample_batch(model, scheduler, diffusion_kwargs, steps, shape, generators, y=None, device="cpu", progress=None,
                 guidance_scale=1.0, null_label=None):
    """
    Run a scheduler from pure noise to images.

    :param model: our ``UNetModel`` (raw timesteps handling is done here).
    :param scheduler: a scheduler from ``make_scheduler``; it is reset to ``steps`` steps.
    :param shape: (N, C, H, W).
    :param generators: N per-sample generators (``sample_generators``); their labels drawn, the
        noise comes from generators on ``device`` seeded alike (``device_generators``).
    :param y: [N] labels for a class-conditional model.
    :param progress: an optional tqdm bar, advanced once per step.
    :param guidance_scale: classifier-free guidance weight (1: none).
    :param null_label: the "no label" class, for ``guidance_scale`` != 1.
    :return: [N x C x H x W] float images, nominally in [-1, 1].
    """
    scheduler.set_timesteps(steps)  # its timesteps and sigmas stay on the CPU: indexing them syncs nothing
    gens = device_generators(generators, device)
    x = randn_tensor(shape, generator=gens, device=torch.device(device))
    # the stochastic steps draw their noise from the per-sample generators (UniPC and DEIS take none)
    noise = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}
    # What the model is given goes to the device once per batch; every step then runs there,
    # scheduler update and noise included, and the images come back once at the end.
    y = None if y is None else y.to(device)
    times = torch.stack([model_timesteps(t, diffusion_kwargs, shape[0]) for t in scheduler.timesteps]).to(device)
    for t, model_t in zip(scheduler.timesteps, times):
        out = model_output(model, scheduler.scale_model_input(x, t), model_t, y, null_label, guidance_scale)
        x = scheduler.step(scheduler_input(out, shape[1], scheduler), t, x, **noise).prev_sample
        if progress is not None:
            progress.update(1)
    return x.cpu()


def generate(model: UNetModel, diffusion_kwargs: dict, image_size: int, num_samples: int, scheduler: str = "ddpm",
             steps: "int | None" = None, batch_size: int = 64, seed: int = 0,
             class_labels: "Sequence[int] | None" = None, accelerator: "Accelerator | None" = None,
             progress: bool = True, device: "torch.device | str | None" = None, guidance_scale: float = 1.0,
             null_label: "int | None" = None) -> "tuple[np.ndarray, np.ndarray | None]":
    """
    Sample ``num_samples`` images, each process its share, gathered on every process.

    :param model: our ``UNetModel`` in eval mode.
    :param diffusion_kwargs: its ``create_diffusion`` arguments.
    :param image_size: height and width.
    :param scheduler: one of ``SCHEDULERS``.
    :param steps: sampling steps (default: the training step count).
    :param class_labels: labels to cycle through (class-conditional models); None: random.
    :param accelerator: an ``Accelerator``; None runs in this process alone.
    :param device: where the model is, without an accelerator (default: the CPU).
    :param guidance_scale: classifier-free guidance weight w >= 0 (1: none; 0: the
        unconditional prediction's mean); needs ``null_label``.
    :param null_label: the "no label" class of a model trained with label dropout
        (``null_class_label(cfg)``); random labels are drawn from the classes below it.
    :return: (NHWC uint8 images, [N] int64 labels or None), in sample-index order.
    """
    steps = diffusion_kwargs.get("steps", 1000) if steps is None else steps
    check_steps(steps, diffusion_kwargs)
    check_seed(seed)
    check_guidance(guidance_scale, model.num_classes, null_label)
    num_classes = real_class_count(model, null_label)  # never draw the null label
    sched = make_scheduler(scheduler, diffusion_kwargs)
    device = accelerator.device if accelerator else torch.device(device or "cpu")
    is_main = accelerator.is_main_process if accelerator else True
    indices = list(range(num_samples))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices) as mine:
            indices = list(mine)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    bar = tqdm(total=len(batches) * steps, desc=f"{scheduler} x{steps}", disable=not (progress and is_main))
    results = []
    for batch in batches:
        gens = sample_generators(seed, batch)
        y = draw_labels(batch, gens, num_classes, class_labels)
        x = sample_batch(model, sched, diffusion_kwargs, steps, (len(batch), model.in_channels, image_size, image_size),
                         gens, y=y, device=device, progress=bar, guidance_scale=guidance_scale, null_label=null_label)
        results += [(i, img, None if y is None else int(y[j])) for j, (i, img) in enumerate(zip(batch, to_uint8(x)))]
    bar.close()
    if accelerator is not None and accelerator.num_processes > 1:
        results = gather_object(results)
    results.sort(key=lambda r: r[0])
    images = np.stack([r[1] for r in results])
    labels = None if model.num_classes is None else np.array([r[2] for r in results], dtype=np.int64)
    return images, labels


def generate_from(loaded: Loaded, num_samples: int, scheduler: str = DEFAULT_SCHEDULER, steps: "int | None" = None,
                  seed: int = 0, class_labels: "list[int] | None" = None, guidance_scale: float = 1.0,
                  batch_size: int = 64, device: "str | None" = None,
                  progress: bool = True) -> "tuple[np.ndarray, np.ndarray | None]":
    """
    Sample a loaded checkpoint (``unet.load_checkpoint``) in this process: ``generate`` with the
    model's own diffusion, image size and null label. Exported as ``unet.generate``.

    :param steps: sampling steps; None: ``DEFAULT_STEPS`` (or every training step, if fewer).
    :param device: where to sample (default: the CPU); the model is moved there.
    :return: (NHWC uint8 images, [N] int64 labels or None).
    """
    model = loaded.model.to(device or "cpu")
    steps = default_steps(loaded.diffusion_kwargs) if steps is None else steps
    return generate(model, loaded.diffusion_kwargs, loaded.image_size, num_samples, scheduler, steps, batch_size,
                    seed, class_labels, progress=progress, device=device, guidance_scale=guidance_scale,
                    null_label=loaded.null_label)
