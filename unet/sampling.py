"""
Sampling a trained model with diffusers' schedulers, and the checkpoint loading that
sampling, evaluation and export share.

The model is ours; the update rules are diffusers': ``ddpm`` is improved-DDPM's ancestral
sampler (learned-range variance, respaced to any K by ``timestep_spacing="linspace"``, which
keeps the same steps as the original's ``space_timesteps(T, "K")``), ``ddim`` and
``dpm-solver++`` are the deterministic fast samplers. Randomness is drawn per sample index,
so a seed gives the same images whatever the batch size or the number of processes.
"""

import argparse
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .diffusion import get_named_beta_schedule
from .images import image_grid, save_png, to_uint8
from .model import UNetModel, attention_downsample_factors

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


def parse_class_labels(spec, num_classes):
    """``"3"`` or ``"0,1,2"`` -> list of labels (cycled over the samples); None -> random."""
    if spec is None or spec == "":
        return None
    if num_classes is None:
        raise ValueError("--class_labels given, but this model is not class-conditional")
    labels = [int(s) for s in str(spec).split(",") if s.strip()]
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class label(s) {bad} out of range for a model with {num_classes} classes")
    return labels


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
             seed=0, class_labels=None, accelerator=None, progress=True):
    """
    Sample ``num_samples`` images, each process its share, gathered on every process.

    :param model: our ``UNetModel`` in eval mode.
    :param diffusion_kwargs: its ``create_diffusion`` arguments.
    :param image_size: height and width.
    :param scheduler: one of ``SCHEDULERS``.
    :param steps: sampling steps (default: the training step count).
    :param class_labels: labels to cycle through (class-conditional models); None: random.
    :param accelerator: an ``Accelerator``; None runs in this process alone.
    :return: (NHWC uint8 images, [N] int64 labels or None), in sample-index order.
    """
    steps = steps or diffusion_kwargs.get("steps", 1000)
    check_steps(steps, diffusion_kwargs)
    sched = make_scheduler(scheduler, diffusion_kwargs)
    device = accelerator.device if accelerator else torch.device("cpu")
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


# --- writing -------------------------------------------------------------------------

def save_samples(out_dir, images, labels=None, pngs=False):
    """
    Write ``grid.png``, ``samples.npz`` (``arr_0`` NHWC uint8, ``arr_1`` labels when
    conditional: the original's format, which existing evaluation suites read) and, on
    request, ``images/NNNNNN.png``.

    :return: the path of ``samples.npz``.
    """
    os.makedirs(out_dir, exist_ok=True)
    # near-square, 1 px black gaps, at its own size: the grid sample.py has always written
    save_png(image_grid(images, math.ceil(math.sqrt(len(images))), pad_value=0), os.path.join(out_dir, "grid.png"),
             min_size=0)
    path = os.path.join(out_dir, "samples.npz")
    np.savez(path, images, *([] if labels is None else [labels]))
    if pngs:
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        for i, img in enumerate(images):
            save_png(img, os.path.join(out_dir, "images", f"{i:06d}.png"), min_size=0)
    return path


# --- loading -------------------------------------------------------------------------

@dataclass
class Loaded:
    """A model ready to sample, with what is needed to rebuild or export it."""
    model: UNetModel
    model_kwargs: dict
    diffusion_kwargs: dict
    image_size: int


# improved-diffusion's ``model_and_diffusion_defaults()``, for configs given as its flags.
IDDPM_DEFAULTS = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                      attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
                      class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                      use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
                      use_checkpoint=False, use_scale_shift_norm=True)
IDDPM_EXTRAS = {"channel_mult", "num_classes", "in_channels"}  # ours: what the original hard-codes
IDDPM_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def iddpm_flags_to_kwargs(flags):
    """
    improved-diffusion's command-line flags (``MODEL_FLAGS``/``DIFFUSION_FLAGS``, as a dict)
    -> (image_size, UNetModel kwargs, create_diffusion kwargs), with its defaults and its
    choice of channel multipliers by image size; ``channel_mult`` may be given to override.
    """
    unknown = set(flags) - set(IDDPM_DEFAULTS) - IDDPM_EXTRAS
    if unknown:
        raise ValueError(f"unknown improved-diffusion flag(s): {', '.join(sorted(unknown))}")
    f = {**IDDPM_DEFAULTS, **flags}
    size = int(f["image_size"])
    mult = f.get("channel_mult") or IDDPM_CHANNEL_MULT.get(size)
    if mult is None:
        raise ValueError(f"improved-diffusion has no channel_mult for image_size {size}; add channel_mult to the config")
    mult = [int(m) for m in (mult.split(",") if isinstance(mult, str) else np.atleast_1d(mult))]
    attention = f["attention_resolutions"]
    attention = attention if isinstance(attention, str) else [int(r) for r in np.atleast_1d(attention)]
    in_ch = int(f.get("in_channels", 3))
    model = dict(in_channels=in_ch, model_channels=int(f["num_channels"]),
                 out_channels=2 * in_ch if f["learn_sigma"] else in_ch, num_res_blocks=int(f["num_res_blocks"]),
                 attention_resolutions=attention_downsample_factors(size, attention),
                 dropout=float(f["dropout"]), channel_mult=tuple(mult),
                 num_classes=(f.get("num_classes") or 1000) if f["class_cond"] else None,
                 num_heads=int(f["num_heads"]), num_heads_upsample=int(f["num_heads_upsample"]),
                 use_scale_shift_norm=bool(f["use_scale_shift_norm"]))
    diffusion = dict(steps=int(f["diffusion_steps"]), learn_sigma=bool(f["learn_sigma"]),
                     sigma_small=bool(f["sigma_small"]), noise_schedule=f["noise_schedule"], use_kl=bool(f["use_kl"]),
                     predict_xstart=bool(f["predict_xstart"]), rescale_timesteps=bool(f["rescale_timesteps"]),
                     rescale_learned_sigmas=bool(f["rescale_learned_sigmas"]))
    return size, model, diffusion


def parse_flag_string(text):
    """``"--image_size 64 --learn_sigma True"`` -> {"image_size": 64, "learn_sigma": True}."""
    tokens, flags = text.split(), {}
    if len(tokens) % 2:
        raise ValueError(f"flags must come in '--name value' pairs: {text!r}")
    for name, value in zip(tokens[::2], tokens[1::2]):
        if not name.startswith("--"):
            raise ValueError(f"expected a --flag, got {name!r}")
        flags[name[2:]] = yaml.safe_load(value) if value.lower() not in ("t", "f") else value.lower() == "t"
    return flags


def architecture_from_config(config):
    """
    (image_size, model kwargs, diffusion kwargs) from a config describing a checkpoint:
    a dict (or a YAML/JSON file, or a flag string) holding improved-diffusion's flags, or
    ``image_size`` with explicit ``model`` and ``diffusion`` kwargs, or this package's
    training config.
    """
    if isinstance(config, str):
        if config.lstrip().startswith("--"):
            return iddpm_flags_to_kwargs(parse_flag_string(config))
        if not os.path.isfile(config):
            raise FileNotFoundError(f"config not found: {config}")
        with open(config) as fh:
            config = yaml.safe_load(fh)
    if not isinstance(config, dict):
        raise ValueError("the config must be a mapping")
    if "model" in config and "diffusion" in config and "image_size" in config and isinstance(config["model"], dict):
        model = dict(config["model"])
        model["attention_resolutions"] = tuple(model.get("attention_resolutions", ()))
        model["channel_mult"] = tuple(model.get("channel_mult", (1, 2, 4, 8)))
        return int(config["image_size"]), model, dict(config["diffusion"])
    if set(config) <= set(IDDPM_DEFAULTS) | IDDPM_EXTRAS:
        return iddpm_flags_to_kwargs(config)
    from .config import TrainConfig  # this package's own config.yaml

    cfg = TrainConfig.from_dict(config)
    return cfg.image_size, cfg.model_kwargs(), cfg.diffusion_kwargs()


def _load_state_dict_strict(model, state_dict, path):
    """Strict loading with a one-line summary of any mismatch."""
    ours, theirs = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
    wrong = sorted(k for k in ours & theirs if model.state_dict()[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name} {len(keys)} (e.g. {keys[0]})" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"checkpoint {path} does not match the model config: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)


def load_iddpm_checkpoint(path, config):
    """An improved-diffusion ``.pt`` state dict (e.g. ``ema_0.9999_500000.pt``) with the
    architecture from ``config`` (see ``architecture_from_config``)."""
    if config is None:
        raise ValueError(f"{path} is an improved-diffusion state dict: pass --config with its model and diffusion flags")
    image_size, model_kwargs, diffusion_kwargs = architecture_from_config(config)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a usable checkpoint
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"checkpoint {path} is not a state dict of tensors")
    model = UNetModel(**model_kwargs)
    _load_state_dict_strict(model, state_dict, path)
    return Loaded(model.eval(), model_kwargs, diffusion_kwargs, image_size)


def load_checkpoint(path, raw=False, ema_rate=None, config=None):
    """
    Load a model to sample from, from either format.

    :param path: this package's checkpoint directory (``.../checkpoint_00001000``) or a
        training output directory (its latest checkpoint), or an improved-diffusion ``.pt``.
    :param raw: the trained weights instead of the EMA ones.
    :param ema_rate: which EMA, when a checkpoint keeps several (default: the first).
    :param config: for ``.pt`` files, the architecture (see ``architecture_from_config``).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isfile(path):
        return load_iddpm_checkpoint(path, config)
    from .checkpoint import load_model  # written alongside the training loop

    ema = False if raw else (ema_rate if ema_rate is not None else True)
    model, _, cfg = load_model(path, ema=ema)
    return Loaded(model.eval(), cfg.model_kwargs(), cfg.diffusion_kwargs(), cfg.image_size)


# --- command line --------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="Sample images from a trained model with a diffusers scheduler.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, training output dir, or improved-diffusion .pt")
    p.add_argument("--config", help="for a .pt checkpoint: YAML with improved-diffusion flags (or a '--flag value' string)")
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddpm")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the training step count)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class_labels", default=None, help="'3' or '0,1,2' (cycled); default: random")
    p.add_argument("--raw", action="store_true", help="use the trained weights, not the EMA")
    p.add_argument("--ema_rate", type=float, default=None)
    p.add_argument("--png", action="store_true", help="also write one PNG per image")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        raise SystemExit("error: --num_samples and --batch_size must be at least 1")
    try:
        loaded = load_checkpoint(args.checkpoint, raw=args.raw, ema_rate=args.ema_rate, config=args.config)
        steps = args.steps or loaded.diffusion_kwargs.get("steps", 1000)
        check_steps(steps, loaded.diffusion_kwargs)
        labels = parse_class_labels(args.class_labels, loaded.model.num_classes)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    # Without cpu=True accelerate ignores a multi-process CPU launch and runs each process alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = loaded.model.to(accelerator.device)
    images, y = generate(model, loaded.diffusion_kwargs, loaded.image_size, args.num_samples, args.scheduler, steps,
                         args.batch_size, args.seed, labels, accelerator)
    if accelerator.is_main_process:
        path = save_samples(args.out, images, y, pngs=args.png)
        print(f"wrote {len(images)} samples ({accelerator.num_processes} processes) to {path} "
              f"and {os.path.join(args.out, 'grid.png')}")
    accelerator.wait_for_everyone()

