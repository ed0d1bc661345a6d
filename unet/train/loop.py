"""The training loop on accelerate: config -> data + model + diffusion -> steps ->
checkpoints, logs and sample grids. ``train(cfg)`` is the whole of it; ``train.py``
only parses the command line, and the ablation calls ``train`` once per run.

``train`` builds a ``Run`` (the parts that do not change) and a ``TrainState`` (what
changes), then loops: ``train_step`` (improved-diffusion's run_step: ``forward_backward``
per micro-batch, clipping, the update, the EMAs) returns a ``StepRecord``; the pure rules
in ``unet.train.state`` count it, decide what a log line holds and when to stop; and
``maybe_eval`` / ``maybe_sample`` / ``maybe_checkpoint`` do the periodic work.

Randomness has two sources, kept apart on purpose. The global RNG (seeded by ``seed``)
initialises the model and drives dropout; accelerate saves and restores it. Everything
about *what* the model sees (data order, flips, t and noise) comes from generators seeded
by (``data_seed``, step), independent of the model and of the number of processes: two init
arms with the same seed see identical batches, and a resumed run replays the same steps."""

import copy
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypedDict

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from unet.config import ConfigError, TrainConfig
from unet.core.diffusion import GaussianDiffusion
from unet.core.model import UNetModel
from unet.core.resample import ScheduleSampler, create_named_schedule_sampler
from unet.data import streaming
from unet.data.dataset import batch_slice, draw_step_inputs, eval_batch, mixed_seed, seeded_generator
from unet.data.splits import ImageData
from unet.sample.sampling import generate
from unet.utils.devices import any_process
from unet.utils.images import image_grid, save_png

from . import diagnostics, hub, phema, quality
from .checkpoint import RunLock, plan, restore, run_state, save_checkpoint, tidy
from .factory import create_diffusion_from_config, create_model
from .preemption import StopSignals
from .setup import (  # noqa: F401 (TrainingError: what train raises)
    TrainingError,
    check_run,
    make_accelerator,
    make_lr_schedule,
    make_optimizer,
    run_layout,
    set_tf32,
)
from .state import LOSS_TERMS, StepRecord, TrainState, log_window, should_stop, stop_message
from .tracking import init_trackers, log_image


@dataclass
class Run:
    """The parts of one run, built once by ``build_run``; ``model`` is the prepared
    (possibly DDP-wrapped) module, ``raw`` the plain one, ``train_model`` what the training
    forward calls (compiled or not)."""

    cfg: TrainConfig
    accelerator: Accelerator
    data: ImageData  # the training images (in memory, lazily decoded, or a stream) and the held-out split
    model: torch.nn.Module
    raw: UNetModel
    train_model: Callable[..., torch.Tensor]
    diffusion: GaussianDiffusion
    sampler: ScheduleSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    emas: dict[float, EMAModel]
    data_seed: int
    eval_batch: "dict | None" = None
    sample_model: "UNetModel | None" = None
    wandb_dir: "str | None" = None
    log: Callable[..., None] = print  # the main process's log (a no-op on the others)
    layout: str = "contiguous"  # the memory format it trains in (unet.core.model.resolve_layout)
    quality: "quality.Quality | None" = None  # sample quality every fid_every steps, or None
    phema: "phema.PowerEMA | None" = None  # post-hoc EMA's power EMAs (main process, phema_every > 0)
    hub: "hub.HubPush | None" = None  # push_to_hub: each checkpoint exported and uploaded (main process)


class TrainSummary(TypedDict):
    """What ``train`` returns (its docstring says what each entry holds)."""

    history: list[dict]
    diverged: bool
    stop_reason: str
    divergence_reason: "str | None"
    nan_skipped: int
    spike_count: int
    initial_loss: "float | None"
    final_loss: "float | None"
    final_eval_loss: "float | None"
    steps: int
    output_dir: str
    checkpoint: "str | None"
    samples: "str | None"
    wandb_dir: "str | None"
    skipped_images: int
    elapsed_seconds: float
    signal: "str | None"


# --- one optimizer step ----------------------------------------------------------------

def gather(accelerator, x):
    """``x`` from every process, concatenated (itself with one process)."""
    return accelerator.gather(x) if accelerator.num_processes > 1 else x


def forward_backward(run, batch, inputs, skip):
    """
    Loss and gradients of one micro-batch (a no-op backward once the step is ``skip``ped,
    though the forward still runs so that dropout's RNG stream does not depend on it).

    :return: (the global micro-batch's loss terms [N, k] and t [N], the term names, skip).
    """
    cfg, acc = run.cfg, run.accelerator
    (x, y), (t, w, noise, flip, drop) = batch, inputs
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(drop, cfg.num_classes, y)  # the null label: classifier-free guidance's unconditional model
    x, y, t, w, noise = (v.to(acc.device) for v in (x, y, t, w, noise))
    with acc.accumulate(run.model):
        terms = run.diffusion.training_losses(run.train_model, x, t, model_kwargs={"y": y} if cfg.class_cond else None,
                                              noise=noise)
        loss = (terms["loss"] * w).mean()
        skip = skip or any_process(acc, ~torch.isfinite(loss.detach()))
        if not skip:
            acc.backward(loss)
            run.sampler.update_with_local_losses(t, terms["loss"].detach(),
                                                 gather=acc.gather if acc.num_processes > 1 else None)
    keys = [k for k in LOSS_TERMS if k in terms]
    stacked = torch.stack([terms[k].detach().float() for k in keys], 1)
    return gather(acc, stacked), gather(acc, t), keys, skip


def batch_terms(values, t, keys, num_timesteps):
    """{term: batch mean} and {term_q0..q3: mean where t falls in that quarter of [0, T)}."""
    out = {k: values[:, i].mean().item() for i, k in enumerate(keys)}
    for i, k in enumerate(keys):
        for q, v in diagnostics.loss_by_quartile(t, values[:, i], num_timesteps).items():
            out[f"{k}_{q}"] = v
    return out


def train_step(run, step, loader):
    """
    One optimizer step on the global batch of ``step`` (0-based): forward/backward per
    micro-batch, clipping, the update and the EMAs; nothing at all if the loss or (without
    fp16's grad scaler, which handles it) the gradient is non-finite on any process.
    """
    cfg, acc = run.cfg, run.accelerator
    shape = (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    inputs = draw_step_inputs(run.sampler, seeded_generator(run.data_seed, step), shape, cfg.random_flip,
                              cfg.class_dropout_prob)
    skip, values, ts = False, [], []
    for micro in range(cfg.grad_accum):
        sl = batch_slice(micro, acc.process_index, cfg.batch_size, cfg.grad_accum, acc.num_processes)
        v, t, keys, skip = forward_backward(run, next(loader), [x[sl] for x in inputs], skip)
        values.append(v)
        ts.append(t)
    grad_norm = None
    if not skip:
        grad_norm = float(acc.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or float("inf")))
        skip = acc.scaler is None and not math.isfinite(grad_norm)
    if skip:
        run.optimizer.zero_grad(set_to_none=True)
        return StepRecord(step=step + 1, lr=run.scheduler.get_last_lr()[0], skipped=True)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    for ema in run.emas.values():
        ema.step(run.raw.parameters())
    terms = batch_terms(torch.cat(values).cpu(), torch.cat(ts).cpu(), keys, run.diffusion.num_timesteps)
    return StepRecord(step=step + 1, lr=run.scheduler.get_last_lr()[0], terms=terms, grad_norm=grad_norm)


# --- periodic work ---------------------------------------------------------------------

def maybe_diagnose(run, step):
    """Every ``diagnostics_every`` steps, before the update: per-ResBlock residual/skip RMS
    ratios and activation RMS by depth on the fixed batch (eval mode: no dropout, no RNG),
    and a tracker for this step's update-to-weight ratio. Else ({}, None)."""
    every = run.cfg.diagnostics_every
    if not (every and step % every == 0):
        return {}, None
    return diagnostics.block_measures(run.raw, *run.eval_batch["diag"]), diagnostics.UpdateRatioTracker(run.raw)


def maybe_eval(run, done):
    """The loss on the fixed held-out batch every ``eval_every`` steps and at the last."""
    cfg, acc, e = run.cfg, run.accelerator, run.eval_batch
    if not cfg.eval_every or (done % cfg.eval_every and done != cfg.max_steps):
        return {}
    run.raw.eval()
    with torch.no_grad(), acc.autocast():
        terms = run.diffusion.training_losses(run.raw, e["x"].to(acc.device), e["t"].to(acc.device),
                                              model_kwargs=e["kwargs"], noise=e["noise"].to(acc.device))
    run.raw.train()
    return {f"eval_{k}": v.float().mean().item() for k, v in terms.items()}


def write_samples(run, step):
    """The first EMA's sample grid (a row per class when that fits) as
    ``samples/samples_<step>.png`` and to the tracker; main process only (else None)."""
    cfg = run.cfg
    if run.sample_model is None:
        return None
    run.emas[cfg.ema_rates[0]].copy_to(run.sample_model.parameters())
    n = cfg.num_samples
    # Ancestral DDPM sampling over sample_steps respaced steps, the classes in turn; this
    # process alone (the others do not sample), on the training device.
    images, _ = generate(run.sample_model, cfg.diffusion_kwargs(), cfg.image_size, n, scheduler="ddpm",
                         steps=min(cfg.sample_steps, cfg.diffusion_steps), seed=run.data_seed,
                         class_labels=list(range(cfg.num_classes)) if cfg.class_cond else None, progress=False,
                         device=run.accelerator.device)
    nrow = cfg.num_classes if cfg.class_cond and n % cfg.num_classes == 0 else math.ceil(math.sqrt(n))
    grid = image_grid(images, nrow=nrow)
    os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
    path = os.path.join(cfg.output_dir, "samples", f"samples_{step:08d}.png")
    save_png(grid, path)
    log_image(run.accelerator, cfg.report_to, "samples", grid, step)
    return path


def maybe_sample(run, state, done, final=False):
    """A grid every ``sample_every`` steps during the run (the last step's comes with
    ``final``, after the loop) and, with ``final``, at the end unless ``sample_every`` < 0."""
    every = run.cfg.sample_every
    due = every >= 0 if final else (every > 0 and done % every == 0 and done != run.cfg.max_steps)
    if due:
        state.last_samples = write_samples(run, done) or state.last_samples


def maybe_checkpoint(run, state, record, stop, log, force=False, last_good=False):
    """A checkpoint every ``checkpoint_every`` steps, at the last step and when a hook or a
    signal stops the run; never after a skipped (non-finite) step or with non-finite
    weights, so that the latest checkpoint is always a good one.

    :param last_good: the run ends on a skipped step: its weights are the last good ones
        (a skipped step changes none), saved under its step if they are finite."""
    cfg, done = run.cfg, record.step
    if not ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.max_steps
            or stop in ("hook", "preempted", "max_minutes") or force or last_good):
        return
    if (record.skipped and not last_good) or not all(torch.isfinite(p).all() for p in run.raw.parameters()):
        log(f"step {done}: checkpoint not written (non-finite loss or weights); latest good: {state.last_checkpoint}")
        return
    train_state = {**run_state(run, state), "step": done}
    state.last_checkpoint = save_checkpoint(run.accelerator, cfg.output_dir, done, cfg, run.model, run.emas,
                                            train_state, cfg.keep_checkpoints)
    if run.hub:
        run.hub.push(state.last_checkpoint)


def maybe_log(run, state, bar):
    """Every ``log_every`` steps and at the last: one log line from the last ``log_every``
    history rows (at a last step off that grid, some of them were in the previous line too),
    with the throughput since the previous line."""
    cfg, done = run.cfg, state.history[-1]["step"]
    if done % cfg.log_every and done != cfg.max_steps:
        return
    ips = state.window_images / max(state.window_seconds, 1e-9)
    run.accelerator.log(log_window(state.history[-cfg.log_every:], ips), step=done)
    bar.set_postfix(loss=f"{state.history[-1]['loss']:.4f}", img_s=f"{ips:.0f}")
    state.window_seconds, state.window_images = 0.0, 0


# --- setup -----------------------------------------------------------------------------

def build_run(cfg, accelerator, log, resume_path=None):
    """Data, then (seeded) model, diffusion, importance sampler, optimizer, lr schedule and
    EMAs, prepared by accelerate: the parts of a ``Run`` (the eval batch and trackers follow)."""
    with accelerator.main_process_first():
        data = streaming.load_data(cfg, log=log)
    set_seed(cfg.seed)  # after data loading, so the init does not depend on it
    model = create_model(cfg)  # the same initial weights on every process
    layout = run_layout(cfg, model, resume_path, log)  # before the optimizer sees the weights
    if accelerator.process_index:
        # Dropout masks differ between processes; process 0 keeps the stream of a one-process run.
        set_seed(mixed_seed(cfg.seed, accelerator.process_index) % 2 ** 32)
    diffusion = create_diffusion_from_config(cfg)
    sampler = create_named_schedule_sampler(cfg.schedule_sampler, diffusion)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_lr_schedule(optimizer, cfg)
    set_tf32(cfg, accelerator.device, log)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    # Compiled for the training forward/backward only: checkpoints, EMA, eval and sampling
    # keep using the plain module, so files and keys are the same either way.
    train_model = torch.compile(model) if cfg.compile else model
    emas = {r: make_ema(raw.parameters(), r, cfg.ema_warmup) for r in cfg.ema_rates}
    return Run(cfg=cfg, accelerator=accelerator, data=data, model=model, raw=raw, train_model=train_model,
               diffusion=diffusion, sampler=sampler, optimizer=optimizer, scheduler=scheduler, emas=emas,
               data_seed=cfg.seed if cfg.data_seed < 0 else cfg.data_seed, log=log, layout=layout,
               phema=phema.make(cfg, raw.parameters(), accelerator.is_main_process),
               hub=hub.make(cfg, accelerator.is_main_process, log))


def make_ema(params, rate, warmup=True):
    """
    An EMA of ``params`` (diffusers' ``EMAModel``).

    :param warmup: True: diffusers' decay min(rate, (1 + t) / (10 + t)), which lets early
        weights fade quickly. False: improved-diffusion's constant ``rate`` from the first
        update on, starting from the initial weights; with EMAModel that is ``min_decay=rate``
        (the floor) and ``update_after_step=-1`` (its step count then never reads 0, where it
        would copy the weights instead of averaging).
    """
    if warmup:
        return EMAModel(params, decay=rate, foreach=True)
    return EMAModel(params, decay=rate, min_decay=rate, update_after_step=-1, foreach=True)


# --- the loop --------------------------------------------------------------------------

def end_run(accelerator, run):
    """
    ``accelerator.end_training()`` (trackers closed, process group destroyed), after dropping
    the DDP wrapper of ``run`` (a ``training.Run``, or None). Otherwise the wrapper's reducer
    outlives the group and, freed later with the GIL held, runs the gloo group's destructor,
    which joins a worker thread that may need the GIL to free its last work: a deadlock at the
    end of a multi-process run (seen once in
    ``test_two_machines_train_together_like_one_two_process_launch``). The plain module
    (``run.raw``, what hooks got) stays usable.
    """
    if run is not None:
        run.model = run.train_model = None
    accelerator.free_memory()  # accelerate's own references to the prepared objects, then gc
    accelerator.end_training()


def train(cfg: TrainConfig, hooks: Iterable[Callable] = (), stop_signals: bool = False) -> TrainSummary:
    """
    Train a U-Net as ``cfg`` says; resumable, multi-process through accelerate.

    :param cfg: a ``TrainConfig``.
    :param hooks: callables ``hook(step, record, model)`` run after every optimizer step on
        every process, with the unwrapped model; a hook returning True stops the run.
    :param stop_signals: True: SIGTERM/SIGUSR1 stop the run after the current step with a
        checkpoint (stop_reason "preempted"; ``train.py`` does this). False leaves the
        caller's signal handling alone (the ablation's workers, library use).
    :return: dict with ``history`` (one dict per step: step, loss, mse, vb, grad_norm, lr,
        loss_q0..3, and where measured eval_loss, residual_ratios, activation_rms),
        ``diverged``, ``stop_reason`` (max_steps | max_minutes | nan | diverged | preempted | hook),
        ``divergence_reason`` (one line, or None), ``nan_skipped``, ``spike_count``,
        ``initial_loss``, ``final_loss``, ``final_eval_loss``, ``steps``, ``output_dir``,
        ``checkpoint`` (the latest good one), ``samples`` (last grid PNG), ``wandb_dir``,
        ``skipped_images`` (corrupt image files left out of the data), ``elapsed_seconds`` (the
        training loop's wall time, over resumes: what ``max_minutes`` reads) and ``signal`` (the
        stop signal received, e.g. "SIGTERM", or None; stop_reason "preempted").
    """
    resume_path, stale, changes = plan(cfg)  # refusals and a bad resume path fail before anything starts
    accelerator, cfg = make_accelerator(cfg, resume_path)  # cfg.mixed_precision: the one accelerate uses
    run, lock = None, RunLock(cfg.output_dir)
    try:
        check_run(cfg, accelerator)
        own_folder(accelerator, lock)  # one run writes output_dir at a time
        log = print if accelerator.is_main_process else (lambda *a, **k: None)
        # The FID reference is read and checked before any training work (its saved history
        # is restored with the rest of the run's parts).
        quality.fetch_inception(cfg, accelerator, log)  # once per machine, before any process looks for it
        measures = quality.prepare(cfg, accelerator.device, log)
        if accelerator.is_main_process:
            tidy(cfg.output_dir, stale, log)
        accelerator.wait_for_everyone()
        with StopSignals(install=stop_signals) as signals:  # SIGTERM/SIGUSR1: stop with a checkpoint
            run = build_run(cfg, accelerator, log, resume_path)
            run.quality = measures
            state = TrainState(divergence=diagnostics.DivergenceMonitor(cfg.divergence_factor,
                                                                        cfg.divergence_window),
                               last_checkpoint=resume_path)
            if resume_path:
                restore(run, state, resume_path, changes, log)
            return start_loop(run, state, hooks, signals)
    finally:
        end_run(accelerator, run)  # close the wandb run even when training raised
        lock.__exit__()


def own_folder(accelerator, lock: RunLock) -> None:
    """The main process takes ``output_dir``'s lock; if it is held, every process raises its
    one-line ``ConfigError`` (the others would otherwise wait at the next barrier)."""
    error = None
    if accelerator.is_main_process:
        try:
            lock.__enter__()
        except ConfigError as e:
            error = e
    if any_process(accelerator, error is not None):
        raise error or ConfigError(f"output_dir '{lock.folder}' is in use by another run")


def start_loop(run, state, hooks, signals):
    """The config next to the checkpoints, trackers, the fixed eval batch and the sampling
    copy of the model, then ``train_loop``."""
    cfg, accelerator = run.cfg, run.accelerator
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        cfg.save(os.path.join(cfg.output_dir, "config.yaml"))
        phema.tidy_snapshots(cfg.output_dir, state.step, run.log)
    run.wandb_dir = init_trackers(accelerator, cfg, resumed_from=state.last_checkpoint)
    run.eval_batch = eval_batch(run.data, run.diffusion, cfg, accelerator.device)
    if accelerator.is_main_process and cfg.sample_every >= 0:
        run.sample_model = copy.deepcopy(run.raw).eval().requires_grad_(False)
    return train_loop(run, state, hooks, signals)


def end_of_step(run: Run, state: TrainState, record: StepRecord, stop: "str | None", signalled: bool) -> tuple:
    """The grid, FID and checkpoint of a step that did not diverge; returns (stop, why). After a
    stop signal the checkpoint comes first and the grid and FID of the step are skipped (a resumed
    run does the later ones). A last step whose loss was not finite is no clean finish: its
    unchanged weights, the last good ones, are saved and the run stops as "nan"."""
    if stop == "max_steps" and record.skipped:
        maybe_checkpoint(run, state, record, "nan", run.log, last_good=True)
        return "nan", f"the last step ({record.step}) had a non-finite loss and was skipped"
    new_best = False
    if not signalled:
        maybe_sample(run, state, record.step)
        new_best = quality.maybe_measure(run, state, record.step)  # True: keep_best_fid and a new lowest FID
    maybe_checkpoint(run, state, record, stop, run.log, force=new_best)
    if new_best:
        quality.keep_best(run, state, record.step)
    return stop, None


def train_loop(run, state, hooks, signals):
    """Steps from ``state.step`` to ``max_steps`` or a stop rule; returns ``train``'s result.
    ``signals`` (``StopSignals``): a stop signal on any process ends the run after the step."""
    cfg, acc = run.cfg, run.accelerator
    start, stop, why = state.step, None, None
    loader = iter(streaming.train_loader(run.data, cfg, start, acc.process_index, acc.num_processes, run.data_seed))
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (acc.is_main_process and cfg.progress), desc="train")
    run.model.train()
    clock = time.perf_counter() - state.elapsed  # the run's training clock, continued on resume
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()  # training time only: eval, samples and checkpoints excluded
        # Diagnostics before the update, the step, its counters and divergence verdict.
        measures, update_ratio = maybe_diagnose(run, step)
        record = train_step(run, step, loader)
        if update_ratio is not None and not record.skipped:
            measures["update_to_weight"] = update_ratio.update(run.raw)
        state.observe(record, check_grad_norm=acc.scaler is None)
        state.window_images += cfg.batch_size
        state.window_seconds += time.perf_counter() - t0
        # Held-out loss, history row, log line.
        record.measures = {**measures, **maybe_eval(run, record.step)}
        row = record.as_dict()
        state.history.append(row)
        maybe_log(run, state, bar)
        bar.update(1)
        # Stop rules (every hook runs), then the grid and checkpoint of this step.
        hook_stop = any([bool(h(record.step, row, run.raw)) for h in hooks])
        signalled = any_process(acc, signals.received is not None)
        state.elapsed = time.perf_counter() - clock
        if cfg.max_minutes and acc.num_processes > 1:  # one clock for all, so that all stop at the same step
            state.elapsed = acc.reduce(torch.tensor([state.elapsed], device=acc.device), "mean").item()
        stop = should_stop(state, record, cfg, hook=hook_stop, signalled=signalled)
        if stop in ("nan", "diverged"):
            why = stop_message(stop, record, cfg)
            break  # no checkpoint: the last good one stays the latest
        phema.after_step(run, record)
        stop, why = end_of_step(run, state, record, stop, signalled)
        state.step = record.step
        if stop:
            break
    bar.close()
    stop = stop or "max_steps"
    if stop == "max_minutes":
        run.log(f"max_minutes: stopped after step {state.step}, {state.elapsed:.1f} s of training")
    if stop in ("max_steps", "hook", "max_minutes") and state.step > start and not signals.received:
        maybe_sample(run, state, state.step, final=True)
    acc.wait_for_everyone()
    out = {**result(run, state, stop, why), "signal": signals.received}
    quality.print_summary(run, out)
    return out


def result(run: Run, state: TrainState, stop_reason: str, divergence_reason: "str | None") -> TrainSummary:
    """``train``'s return value (see its docstring)."""
    losses = [r["loss"] for r in state.history if not r.get("skipped")]
    evals = [r["eval_loss"] for r in state.history if "eval_loss" in r]
    return TrainSummary(history=state.history, diverged=stop_reason in ("nan", "diverged"), stop_reason=stop_reason,
                divergence_reason=divergence_reason, nan_skipped=state.nan_skipped, spike_count=state.spikes.count,
                initial_loss=state.divergence.initial_loss, final_loss=losses[-1] if losses else None,
                final_eval_loss=evals[-1] if evals else None, steps=state.step, output_dir=run.cfg.output_dir,
                checkpoint=state.last_checkpoint, samples=state.last_samples, wandb_dir=run.wandb_dir,
                skipped_images=run.data.skipped_images(), elapsed_seconds=state.elapsed)
