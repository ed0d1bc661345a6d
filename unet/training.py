"""The training loop on accelerate: config -> data + model + diffusion -> steps ->
checkpoints, logs and sample grids. ``train(cfg)`` is the whole of it; ``train.py``
only parses the command line, and the ablation calls ``train`` once per run.

Randomness has two sources, kept apart on purpose. The global RNG (seeded by ``seed``)
initialises the model and drives dropout; accelerate saves and restores it. Everything
about *what* the model sees (data order, flips, t and noise) comes from generators seeded
by (``data_seed``, step), independent of the model and of the number of processes: two init
arms with the same seed see identical batches, and a resumed run replays the same steps."""

import copy
import math
import os
import shutil
import time
from types import SimpleNamespace

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel
from einops import rearrange
from PIL import Image
from tqdm.auto import tqdm

from . import diagnostics
from .checkpoint import load_training_state, resolve_resume, save_checkpoint
from .data import batch_slice, fixed_batch, load_image_data, train_loader
from .diffusion import create_diffusion
from .model import UNetModel
from .resample import create_named_schedule_sampler


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message is one line."""


def step_generator(seed, step):
    """The generator for t, noise and flips of one step: a pure function of the data seed,
    so the same for every init arm and across resume."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


def draw_step_inputs(sampler, gen, shape, random_flip):
    """t, importance weights, noise and flip mask for a whole global batch of ``shape``,
    drawn in one go so that they do not depend on the number of processes or micro-batches
    (each takes the slice ``data.batch_slice`` gives it, as it does for the examples)."""
    t, w = sampler.sample(shape[0], "cpu", generator=gen)
    noise = torch.randn(shape, generator=gen)
    flip = torch.rand(shape[0], generator=gen) < 0.5 if random_flip else torch.zeros(shape[0], dtype=torch.bool)
    return t, w, noise, flip


@torch.no_grad()
def sample_images(model, diffusion, shape, gen, y=None, device="cpu"):
    """Ancestral sampling (Ho et al. Alg. 2) with the model's learned or fixed variance:
    x_{t-1} = mu + sigma z, no noise at the last step. Noise comes from the CPU generator
    ``gen`` so the grid is the same on any device. Returns images in [-1, 1] on the CPU."""
    x = torch.randn(shape, generator=gen).to(device)
    kwargs = {} if y is None else {"y": y.to(device)}
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        out = diffusion.p_mean_variance(model, x, t, clip_denoised=True, model_kwargs=kwargs)
        z = torch.randn(shape, generator=gen).to(device) if i > 0 else 0.0
        x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
    return x.clamp(-1, 1).float().cpu()


def image_grid(images, nrow, pad=1):
    """[N, C, H, W] in [-1, 1] -> an (rows*(H+pad), nrow*(W+pad), C) uint8 array, the images
    separated by ``pad`` grey pixels (digits sit on black, so a black gap would hide the cells)."""
    n = images.shape[0]
    rows = math.ceil(n / nrow)
    images = torch.cat([images, -torch.ones(rows * nrow - n, *images.shape[1:])])
    images = torch.nn.functional.pad(images, (0, pad, 0, pad), value=0.0)
    grid = rearrange(images, "(r c) ch h w -> (r h) (c w) ch", r=rows, c=nrow)
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def save_grid(grid, path, min_size=512):
    """Write the grid as PNG, upscaled (nearest) so small images are visible."""
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    scale = max(1, min_size // max(img.size))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def wandb_offline_setup():
    # No API key and no explicit mode: run offline rather than prompting for a login.
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")


def _finite_mean(values):
    """Mean of the finite values (skipped steps log NaN), NaN if there are none."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


def adamw(params, **kwargs):
    """
    ``torch.optim.AdamW`` with its fused kernel: one pass over each parameter instead of
    one per arithmetic op, ~2.9x faster on CPU for the CIFAR-10 model (docs/performance.md),
    the same update up to float rounding. Falls back to the default where fusing is
    unsupported (other devices, non-float parameters).

    :param params: the parameters (or parameter groups) to optimise.
    :param kwargs: ``AdamW`` arguments (lr, weight_decay, ...).
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:
        return torch.optim.AdamW(params, **kwargs)


def _cpu_compiler():
    """The C++ compiler torch.compile's CPU backend would use ($CXX, else inductor's list), or None."""
    from torch._inductor import config as inductor_config

    names = [os.environ.get("CXX")] + [c for c in inductor_config.cpp.cxx]
    return next((shutil.which(c) for c in names if c and shutil.which(c)), None)


def _make_accelerator(cfg):
    log_with = None if cfg.report_to == "none" else cfg.report_to
    if cfg.report_to == "wandb":
        wandb_offline_setup()
    if cfg.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise TrainingError("report_to=tensorboard needs the tensorboard package: pip install tensorboard") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # On a machine with no GPU, `accelerate launch --multi_gpu --num_processes N` starts N
    # processes, but accelerate 1.15 makes each one a separate single-process run unless told
    # to use the CPU: ask for gloo DDP on the CPU explicitly.
    cpu = world > 1 and not torch.accelerator.is_available()
    try:
        # The lr schedule is per optimizer step; accelerate's default would step it once per process.
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                                  log_with=log_with, project_dir=cfg.output_dir, step_scheduler_with_optimizer=False,
                                  cpu=cpu)
    except (ValueError, RuntimeError) as e:
        raise TrainingError(f"accelerate could not start (mixed_precision={cfg.mixed_precision}): "
                            f"{str(e).strip().splitlines()[0]}") from None
    if accelerator.num_processes != world:
        raise TrainingError(f"{world} processes were launched but accelerate sees {accelerator.num_processes}; "
                            "each would train alone and overwrite the others' files")
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which halves the
        # default run's speed on a 2-core machine; share the cores between the processes.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(cfg.cpu_threads or max(1, cores // local))
    return accelerator


def _init_trackers(accelerator, cfg):
    if cfg.report_to == "none":
        return None
    config = cfg.to_dict()
    kwargs = {}
    if cfg.report_to == "wandb":
        kwargs["wandb"] = {"dir": cfg.output_dir, "name": cfg.run_name or None, "group": cfg.group or None,
                           "tags": list(cfg.tags) or None}
    else:  # tensorboard hparams take scalars only
        config = {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in config.items()}
    accelerator.init_trackers(cfg.project, config=config, init_kwargs=kwargs)
    if cfg.report_to == "wandb" and accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        run_dir = os.path.dirname(run.dir.rstrip("/"))
        if run.settings.mode == "offline" or os.environ.get("WANDB_MODE") == "offline":
            print(f"wandb offline: run saved in {run_dir}; upload it later with `wandb sync {run_dir}`")
        return run_dir
    return None


def _log_images(accelerator, cfg, grid, step):
    if cfg.report_to == "wandb":
        import wandb

        accelerator.get_tracker("wandb", unwrap=True).log({"samples": wandb.Image(grid)}, step=step)
    elif cfg.report_to == "tensorboard":
        accelerator.get_tracker("tensorboard", unwrap=True).add_image("samples", grid, step, dataformats="HWC")


def _diagnostics_record(model, batch):
    """Stability measures on a fixed batch: per-ResBlock residual/skip RMS ratio and
    activation RMS by depth (one forward pass in eval mode: no dropout, no RNG use)."""
    stats = diagnostics.block_stats(model, *batch)
    return {"residual_ratios": {s["name"]: s["branch_skip_ratio"] for s in stats},
            "activation_rms": [(s["name"], s["rms"]) for s in stats]}


def train(cfg, hooks=()):
    """
    Train a U-Net as ``cfg`` says; resumable, multi-process through accelerate.

    :param cfg: a ``TrainConfig``.
    :param hooks: callables ``hook(step, record, model)`` run after every optimizer step on
        every process, with the unwrapped model; a hook returning True stops the run.
    :return: dict with ``history`` (one dict per step: step, loss, mse, vb, grad_norm, lr,
        loss_q0..3, and where measured eval_loss, residual_ratios, activation_rms),
        ``diverged``, ``stop_reason`` (max_steps | nan | diverged | hook), ``nan_skipped``,
        ``spike_count``, ``initial_loss``, ``final_loss``, ``final_eval_loss``, ``steps``,
        ``output_dir``, ``checkpoint``, ``samples`` (last grid PNG) and ``wandb_dir``.
    """
    resume_path = resolve_resume(cfg.resume, cfg.output_dir)  # a bad path fails before anything starts
    accelerator = _make_accelerator(cfg)
    try:
        return _train(accelerator, cfg, hooks, resume_path)
    finally:
        accelerator.end_training()  # close the wandb run even when training raised
        # Let the next train() in this process (the ablation's next cell) choose its own
        # mixed precision; the process group (PartialState) stays.
        AcceleratorState._reset_state()


def _train(accelerator, cfg, hooks, resume_path):
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    data_seed = cfg.seed if cfg.data_seed < 0 else cfg.data_seed
    if cfg.batch_size % (cfg.grad_accum * world):
        raise TrainingError(f"config key 'batch_size' ({cfg.batch_size}) must be a multiple of "
                            f"grad_accum x processes = {cfg.grad_accum} x {world}")
    if cfg.compile and device.type == "cpu" and not _cpu_compiler():
        raise TrainingError("compile: true on a CPU needs a C++ compiler for torch.compile (none found: "
                            "install g++ or set CXX, or set compile false)")
    log = print if main else (lambda *a, **k: None)

    with accelerator.main_process_first():
        data = load_image_data(cfg, log=log)
    set_seed(cfg.seed)  # after data loading, so the init does not depend on it
    model = UNetModel(**cfg.model_kwargs())
    diffusion = create_diffusion(**cfg.diffusion_kwargs())
    sampler = create_named_schedule_sampler(cfg.schedule_sampler, diffusion)
    optimizer = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=cfg.warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    # Compiled for the training forward/backward only: checkpoints, EMA, eval and sampling
    # keep using the plain module, so files and keys are the same either way.
    train_model = torch.compile(model) if cfg.compile else model
    emas = {r: EMAModel(raw.parameters(), decay=r, foreach=True) for r in cfg.ema_rates}

    state = dict(step=0, nan_skipped=0, nan_streak=0, initial_loss=None)
    spikes = diagnostics.SpikeDetector()
    divergence = diagnostics.DivergenceMonitor(cfg.divergence_factor, cfg.divergence_window)
    if resume_path:
        loaded = load_training_state(accelerator, resume_path, model, emas)
        for k in state:
            state[k] = loaded.get(k, state[k])
        sampler.load_state_dict(loaded["sampler"])
        spikes.load_state_dict(loaded["spikes"])
        # Checkpoints from before the monitor hold only the initial loss (window 1 needs no more).
        divergence.load_state_dict(loaded.get("divergence", {"initial_loss": state["initial_loss"], "recent": []}))
        for r, ema in emas.items():
            ema.optimization_step = loaded["ema_steps"][f"{r:g}"]
        log(f"resumed from {resume_path} at step {state['step']}")

    if main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        cfg.save(os.path.join(cfg.output_dir, "config.yaml"))
    wandb_dir = _init_trackers(accelerator, cfg)

    # A fixed held-out batch with fixed t and noise: the same numbers for every run.
    eval_split = data.eval if data.eval is not None else data.train
    ex, ey = fixed_batch(eval_split, cfg.eval_batch_size)
    g = torch.Generator().manual_seed(0)
    et = torch.randint(0, diffusion.num_timesteps, (ex.shape[0],), generator=g)
    enoise = torch.randn(ex.shape, generator=g)
    ey = ey if cfg.class_cond else None
    ekw = {} if ey is None else {"y": ey.to(device)}
    nd = min(32, ex.shape[0])
    diag_batch = (diffusion.q_sample(ex[:nd], et[:nd], enoise[:nd]).to(device),
                  diffusion.model_timesteps(et[:nd]).to(device), None if ey is None else ey[:nd].to(device))

    def eval_loss():
        raw.eval()
        with torch.no_grad(), accelerator.autocast():
            terms = diffusion.training_losses(raw, ex.to(device), et.to(device), model_kwargs=ekw,
                                              noise=enoise.to(device))
        raw.train()
        return {f"eval_{k}": v.float().mean().item() for k, v in terms.items()}

    sample_model = copy.deepcopy(raw).eval().requires_grad_(False) if main and cfg.sample_every >= 0 else None
    sample_diffusion = create_diffusion(**{**cfg.diffusion_kwargs(), "timestep_respacing": str(
        min(cfg.sample_steps, cfg.diffusion_steps))})

    def write_samples(step):
        if sample_model is None:
            return None
        emas[cfg.ema_rates[0]].copy_to(sample_model.parameters())
        n = cfg.num_samples
        y = torch.arange(n) % cfg.num_classes if cfg.class_cond else None
        imgs = sample_images(sample_model, sample_diffusion, (n, cfg.channels, cfg.image_size, cfg.image_size),
                             torch.Generator().manual_seed(data_seed), y, device)
        grid = image_grid(imgs, nrow=cfg.num_classes if cfg.class_cond and n % cfg.num_classes == 0 else
                          math.ceil(math.sqrt(n)))
        os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
        path = os.path.join(cfg.output_dir, "samples", f"samples_{step:08d}.png")
        save_grid(grid, path)
        _log_images(accelerator, cfg, grid, step)
        return path

    def checkpoint(step):
        train_state = {**state, "step": step, "sampler": sampler.state_dict(), "spikes": spikes.state_dict(),
                       "divergence": divergence.state_dict(),
                       "ema_steps": {f"{r:g}": e.optimization_step for r, e in emas.items()}}
        return save_checkpoint(accelerator, cfg.output_dir, step, cfg, model, emas, train_state,
                               cfg.keep_checkpoints)

    history, stop_reason, last_ckpt, last_samples = [], "max_steps", resume_path, None
    divergence_reason = None
    start = state["step"]
    loader = iter(train_loader(data, cfg, start, rank, world, data_seed))
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (main and cfg.progress), desc="train")
    window_time, window_imgs = 0.0, 0  # training time only: samples and checkpoints excluded
    model.train()
    for step in range(start, cfg.max_steps):
        step_t0 = time.perf_counter()
        record = {"step": step + 1}
        if cfg.diagnostics_every and step % cfg.diagnostics_every == 0:
            record.update(_diagnostics_record(raw, diag_batch))
            update_ratio = diagnostics.UpdateRatioTracker(raw)
        bad, terms_all, t_all = False, [], []
        shape = (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
        step_inputs = draw_step_inputs(sampler, step_generator(data_seed, step), shape, cfg.random_flip)
        for micro in range(cfg.grad_accum):
            x, y = next(loader)
            sl = batch_slice(micro, rank, cfg.batch_size, cfg.grad_accum, world)
            t, w, noise, flip = (v[sl] for v in step_inputs)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x, y, t, w, noise = (v.to(device) for v in (x, y, t, w, noise))
            with accelerator.accumulate(model):
                terms = diffusion.training_losses(train_model, x, t, model_kwargs={"y": y} if cfg.class_cond else None,
                                                  noise=noise)
                loss = (terms["loss"] * w).mean()
                # Every process must agree to skip, or DDP's gradient all-reduce would hang.
                nonfinite = (~torch.isfinite(loss.detach())).float().reshape(1)
                bad = bad or bool((accelerator.reduce(nonfinite, "sum") if world > 1 else nonfinite).item())
                if not bad:
                    accelerator.backward(loss)
                    sampler.update_with_local_losses(t, terms["loss"].detach(),
                                                     gather=accelerator.gather if world > 1 else None)
            stacked = torch.stack([terms[k].detach().float() for k in ("loss", "mse", "vb") if k in terms], 1)
            terms_all.append(accelerator.gather(stacked) if world > 1 else stacked)
            t_all.append(accelerator.gather(t) if world > 1 else t)
        keys = [k for k in ("loss", "mse", "vb") if k in terms]
        terms_all, t_all = torch.cat(terms_all).cpu(), torch.cat(t_all).cpu()
        if not bad:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            # fp16's grad scaler skips inf/NaN gradients itself (and must see them to lower its
            # scale); otherwise a non-finite gradient is a bad step like a non-finite loss.
            bad = accelerator.scaler is None and not math.isfinite(float(grad_norm))
        if bad:
            optimizer.zero_grad(set_to_none=True)
            state["nan_skipped"] += 1
            state["nan_streak"] += 1
            record.update(loss=float("nan"), skipped=True, lr=scheduler.get_last_lr()[0])
        else:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for ema in emas.values():
                ema.step(raw.parameters())
            if "residual_ratios" in record:
                record["update_to_weight"] = update_ratio.update(raw)
            state["nan_streak"] = 0
            record.update({k: terms_all[:, i].mean().item() for i, k in enumerate(keys)})
            for i, k in enumerate(keys):
                for q, v in diagnostics.loss_by_quartile(t_all, terms_all[:, i], diffusion.num_timesteps).items():
                    record[f"{k}_{q}"] = v
            record.update(grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0])
            record["spike"] = bool(spikes.update(record["loss"]))
        record["spike_count"], record["nan_skipped"] = spikes.count, state["nan_skipped"]
        window_imgs += cfg.batch_size
        window_time += time.perf_counter() - step_t0
        done = step + 1
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            record.update(eval_loss())
        history.append(record)

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            ips = window_imgs / max(window_time, 1e-9)
            recent = history[-min(len(history), cfg.log_every):]
            logged = {f"train/{k}": _finite_mean([r.get(k) for r in recent])
                      for k in record if k.startswith(("loss", "mse", "vb"))}
            if "update_to_weight" in record:
                logged["stability/update_to_weight"] = record["update_to_weight"]
            logged.update({"train/grad_norm": record.get("grad_norm", float("nan")), "train/lr": record["lr"],
                           "train/images_per_sec": ips, "stability/spike_count": spikes.count,
                           "stability/nan_skipped": state["nan_skipped"]})
            for k in ("eval_loss", "eval_mse", "eval_vb"):
                if k in record:
                    logged[f"eval/{k[5:]}"] = record[k]
            for r in recent:
                for name, v in r.get("residual_ratios", {}).items():
                    logged[f"stability/residual_ratio/{name}"] = v
                for i, (name, v) in enumerate(r.get("activation_rms", [])):
                    logged[f"stability/activation_rms/{i:02d}_{name}"] = v
            accelerator.log(logged, step=done)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{ips:.0f}")
            window_time, window_imgs = 0.0, 0
        bar.update(1)

        # A skipped step logs its loss as NaN, so it diverges even at step 1. fp16's grad scaler
        # handles a non-finite gradient itself (it lowers its scale), so that is not divergence.
        why = divergence.update(record["loss"], None if accelerator.scaler else record.get("grad_norm"))
        state["initial_loss"] = divergence.initial_loss
        stop = None
        if state["nan_streak"] >= cfg.max_nan_steps:
            stop, divergence_reason = "nan", f"{cfg.max_nan_steps} non-finite losses in a row"
        elif cfg.divergence_factor and why:
            stop, divergence_reason = "diverged", why
        if any([bool(h(done, record, raw)) for h in hooks]) and stop is None:
            stop = "hook"
        if stop in ("nan", "diverged"):
            stop_reason = stop
            break  # no checkpoint: the last good one stays the latest
        if cfg.sample_every > 0 and done % cfg.sample_every == 0 and done != cfg.max_steps:
            last_samples = write_samples(done) or last_samples
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.max_steps or stop == "hook":
            last_ckpt = checkpoint(done)
        state["step"] = done
        if stop:
            stop_reason = stop
            break
    bar.close()

    if stop_reason in ("max_steps", "hook") and cfg.sample_every >= 0 and state["step"] > start:
        last_samples = write_samples(state["step"]) or last_samples
    accelerator.wait_for_everyone()
    losses = [r["loss"] for r in history if not r.get("skipped")]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    return dict(history=history, diverged=stop_reason in ("nan", "diverged"), stop_reason=stop_reason,
                nan_skipped=state["nan_skipped"], spike_count=spikes.count, initial_loss=state["initial_loss"],
                final_loss=losses[-1] if losses else None, final_eval_loss=evals[-1] if evals else None,
                steps=state["step"], output_dir=cfg.output_dir, checkpoint=last_ckpt, samples=last_samples,
                wandb_dir=wandb_dir, skipped_images=data.skipped, divergence_reason=divergence_reason)
