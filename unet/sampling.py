"""
Sampling a trained model with diffusers' schedulers: the schedulers, per-sample randomness
and the loop. Loading is ``unet.checkpoint``'s; the command line and the files it writes are
``sample.py``'s.

The model is ours; the update rules are diffusers': ``ddpm`` is improved-DDPM's ancestral
sampler (learned-range variance, respaced to any K by ``timestep_spacing="linspace"``, which
keeps the same steps as the original's ``space_timesteps(T, "K")``), ``ddim`` and
``dpm-solver++`` are the deterministic fast samplers. Randomness is drawn per sample index,
so a seed gives the same images whatever the batch size or the number of processes.
"""


import numpy as np
import torch
from accelerate.utils import gather_object
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .diffusion import get_named_beta_schedule
from .images import to_uint8

SCHEDULERS = ("ddpm", "ddim", "dpm-solver++")


# --- schedulers ----------------------------------------------------------------------

def beta_schedule_kwargs(noise_schedule, steps):
    """diffusers' name for improved-DDPM's beta schedule over ``steps`` training steps.
    The linear schedule is scaled by 1000/T so that any T spans the same noise range."""
    if noise_schedule == "cosine":
        return dict(beta_schedule="squaredcos_cap_v2")
    if noise_schedule == "linear":
        scale = 1000 / steps
        return dict(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02)
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
    if name == "dpm-solver++":
        # variance_type stays None: with it set, diffusers keeps channels [:, :3], wrong for
        # 1- or 4-channel images; ``scheduler_input`` drops the variance channels instead.
        # x_0 is clipped to [-1, 1] as in the other two (thresholding with a maximum of 1 is a
        # plain clip); without it, our cosine-schedule digits model gives saturated noise at 20
        # steps. diffusers asks for lambda_min_clipped with the cosine schedule.
        cosine = diffusion_kwargs.get("noise_schedule") == "cosine"
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           thresholding=True, sample_max_value=1.0,
                                           lambda_min_clipped=-5.1 if cosine else -float("inf"))
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


def scheduler_input(model_output, channels, scheduler):
    """The model output a scheduler's ``step`` expects: DDPM with a learned range takes all
    2C channels; the others take the mean part only, whatever C is."""
    if isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in ("learned", "learned_range"):
        return model_output
    return model_output[:, :channels]


def model_timesteps(t, diffusion_kwargs, batch_size):
    """The timesteps the model is called with at scheduler step ``t`` (an original-process
    index): scaled to [0, 1000) when the model was trained with ``rescale_timesteps``."""
    t = torch.full((batch_size,), int(t), dtype=torch.long)
    if diffusion_kwargs.get("rescale_timesteps"):
        return t.float() * (1000.0 / diffusion_kwargs.get("steps", 1000))
    return t


def check_steps(steps, diffusion_kwargs):
    """Reject a step count the scheduler cannot take, in one line."""
    total = diffusion_kwargs.get("steps", 1000)
    if not 1 <= steps <= total:
        raise ValueError(f"--steps {steps} is out of range: this model was trained with {total} diffusion steps")


# --- randomness per sample -----------------------------------------------------------

def sample_generators(seed, indices):
    """One generator per sample index, so that sample i's labels and noise depend only on
    (seed, i), not on how samples are batched or split across processes."""
    gens = []
    for i in indices:
        state = np.random.SeedSequence([seed, int(i)]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


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
def sample_batch(model, scheduler, diffusion_kwargs, steps, shape, generators, y=None, device="cpu", progress=None):
    """
    Run a scheduler from pure noise to images.

    :param model: our ``UNetModel`` (raw timesteps handling is done here).
    :param scheduler: a scheduler from ``make_scheduler``; it is reset to ``steps`` steps.
    :param shape: (N, C, H, W).
    :param generators: N per-sample generators (``sample_generators``).
    :param y: [N] labels for a class-conditional model.
    :param progress: an optional tqdm bar, advanced once per step.
    :return: [N x C x H x W] float images, nominally in [-1, 1].
    """
    scheduler.set_timesteps(steps)
    x = randn_tensor(shape, generator=generators).to(device)
    kwargs = {} if y is None else {"y": y.to(device)}
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), model_timesteps(t, diffusion_kwargs, shape[0]).to(device), **kwargs)
        out = scheduler_input(out, shape[1], scheduler).cpu()
        # Step on the CPU so that the per-sample CPU generators drive the noise.
        x = scheduler.step(out, t, x.cpu(), generator=generators).prev_sample.to(device)
        if progress is not None:
            progress.update(1)
    return x.cpu()


def generate(model, diffusion_kwargs, image_size, num_samples, scheduler="ddpm", steps=None, batch_size=64,
             seed=0, class_labels=None, accelerator=None, progress=True, device=None):
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
    :return: (NHWC uint8 images, [N] int64 labels or None), in sample-index order.
    """
    steps = steps or diffusion_kwargs.get("steps", 1000)
    check_steps(steps, diffusion_kwargs)
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
        y = draw_labels(batch, gens, model.num_classes, class_labels)
        x = sample_batch(model, sched, diffusion_kwargs, steps, (len(batch), model.in_channels, image_size, image_size),
                         gens, y=y, device=device, progress=bar)
        results += [(i, img, None if y is None else int(y[j])) for j, (i, img) in enumerate(zip(batch, to_uint8(x)))]
    bar.close()
    if accelerator is not None and accelerator.num_processes > 1:
        results = gather_object(results)
    results.sort(key=lambda r: r[0])
    images = np.stack([r[1] for r in results])
    labels = None if model.num_classes is None else np.array([r[2] for r in results], dtype=np.int64)
    return images, labels
