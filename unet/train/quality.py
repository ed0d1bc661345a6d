"""
Sample quality during training, and the block a run prints when it ends.

Every ``fid_every`` steps, the first EMA's weights sample ``fid_num_samples`` images across
all processes (``fid_scheduler`` x ``fid_steps``, at most the diffusion's steps; seeded by the data seed, so
that every measurement sees the same labels and initial noise); FID, KID and precision/recall
against the reference go to the tracker as ``eval/*``, into the history row and into the
checkpoint's ``train_state.json``. For digits the features are the digit judge's, and its
accuracy on the requested labels is logged too. With ``keep_best_fid`` the checkpoint of a
new lowest FID is written at that step and copied (hard links where the disk allows) to
``output_dir/best``.

The reference is read and checked (extractor, image shape, size) before the first step:
a bad one is a one-line ``ConfigError`` (exit status 2). The feature space, the judges, the
reference and the measures themselves are ``unet.evaluation.quality``'s, which ``evaluate.py``
uses too.
"""

import copy
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from unet.config import ConfigError
from unet.evaluation.fid import ensure_inception_weights, fid_unavailable_reason
from unet.evaluation.metrics import Reference, ReferenceError
from unet.evaluation.quality import extractor_for, feature_space, load_reference, sample_quality
from unet.sample.sampling import generate, null_class_label
from unet.utils.jsonfile import write_json

BEST_DIR = "best"


@dataclass
class Quality:
    """What the run measures against, built once by ``prepare``, and what it measured."""

    extractor: object
    reference: Reference
    digits: object = None  # the DigitReference when the features are the judge's
    model: object = None  # the EMA copy that samples (every process)
    history: list = field(default_factory=list)
    best_fid: float = math.inf
    best_step: int = None
    seconds: float = 0.0  # wall time spent measuring in the training loop in this call of train (sampling included)
    prepare_seconds: float = 0.0  # wall time of ``prepare``, before the first step

    def state_dict(self):
        return {"history": self.history, "best_fid": None if math.isinf(self.best_fid) else self.best_fid,
                "best_step": self.best_step}

    def load_state_dict(self, state):
        self.history = list(state.get("history", []))
        self.best_fid = math.inf if state.get("best_fid") is None else state["best_fid"]
        self.best_step = state.get("best_step")


def fetch_inception(cfg, accelerator, log) -> None:
    """With ``fid_download_inception``, Inception's weights downloaded into the cache if missing, by
    one process per machine while the others wait, so that every process then finds the same file
    (or none: ``prepare`` then turns measuring off on every process alike). A failed download is one
    line; training goes on."""
    wanted = cfg.fid_download_inception and cfg.fid_every and feature_space(cfg) == "inception"
    if wanted and accelerator.is_local_main_process:
        _, why = ensure_inception_weights(cfg.fid_inception_weights or None, download=True, log=log)
        if why:
            log(why)
    accelerator.wait_for_everyone()


def prepare(cfg, device, log, saved=None):
    """
    Before the first step: the feature extractor and the reference, checked. None when
    nothing will be measured (``fid_every`` 0 or past ``max_steps``), or (with a one-line
    log) when Inception is asked for and absent.

    :param saved: a resumed checkpoint's ``train_state`` (its ``quality`` entry is restored).
    """
    if not cfg.fid_every or cfg.fid_every > cfg.max_steps:
        return None
    start, digits = time.perf_counter(), None
    try:
        space, shape = feature_space(cfg), (cfg.image_size, cfg.image_size, cfg.channels)
        reason = None if space == "judge" else fid_unavailable_reason(cfg.fid_inception_weights or None)
        if reason:
            log(f"{reason}; this run logs no eval/fid (fid_every 0 silences this)")
            return None
        extractor, digits = extractor_for(space, shape, cfg.fid_inception_weights or None, device, cfg, log)
        ref, line = load_reference(cfg, extractor)
        ref.check(extractor.name, (cfg.image_size, cfg.image_size, cfg.channels), cfg.fid_ref or "the held-out split")
    except ReferenceError as e:
        raise ConfigError(f"config key 'fid_ref': {e}") from None
    if len(ref.features) < cfg.kid_subset_size:
        raise ConfigError(f"config key 'kid_subset_size': got {cfg.kid_subset_size}, but the reference has only "
                          f"{len(ref.features)} images; give at most {len(ref.features)}")
    log(f"sample quality every {cfg.fid_every} steps: {cfg.fid_num_samples} samples, {cfg.fid_scheduler} x "
        f"{cfg.fid_steps}, features {extractor.name}; {line}")
    q = Quality(extractor, ref, digits)
    q.load_state_dict((saved or {}).get("quality", {}))
    q.prepare_seconds = time.perf_counter() - start  # fitting the judge, the reference's features
    return q


def measure(run):
    """Sample with the first EMA on every process and measure; the measures as log keys."""
    cfg, q = run.cfg, run.quality
    if q.model is None:
        q.model = copy.deepcopy(run.raw).eval().requires_grad_(False)
    run.emas[cfg.ema_rates[0]].copy_to(q.model.parameters())
    images, labels = generate(q.model, cfg.diffusion_kwargs(), cfg.image_size, cfg.fid_num_samples, cfg.fid_scheduler,
                              min(cfg.fid_steps, cfg.diffusion_steps), cfg.fid_batch_size, seed=run.data_seed,
                              accelerator=run.accelerator, progress=False, null_label=null_class_label(cfg))
    m = sample_quality(q.reference, q.extractor, q.digits, images, labels, cfg.kid_subset_size)
    keys = ("fid", "kid", "kid_std", "precision", "recall", "inception_score", "inception_score_std", "judge_fd",
            "judge_fd_floor", "judge_accuracy")
    return {f"eval/{k}": m[k] for k in keys if k in m}


def maybe_measure(run, state, done):
    """Every ``fid_every`` steps: measure, log, add to the history row.
    Returns True when this FID is a new lowest and ``keep_best_fid`` asks to keep it."""
    cfg, q = run.cfg, run.quality
    if q is None or done % cfg.fid_every:
        return False
    start = time.perf_counter()
    out = measure(run)
    seconds = time.perf_counter() - start
    q.seconds += seconds
    run.accelerator.log(out, step=done)
    state.history[-1].update(out)
    q.history.append({"step": done, **out, "seconds": seconds})
    run.log(f"step {done}: sample quality ({cfg.fid_num_samples} samples, {seconds:.1f} s): {figures_line(out)}")
    if not out["eval/fid"] < q.best_fid:  # the pointer moves only when FID falls
        return False
    q.best_fid, q.best_step = out["eval/fid"], done
    return cfg.keep_best_fid


def keep_best(run, state, done):
    """Copy this step's checkpoint to ``output_dir/best`` (main process), replacing the old."""
    ckpt, acc = state.last_checkpoint, run.accelerator
    if acc.is_main_process and ckpt and ckpt.endswith(f"{done:08d}"):
        best = os.path.join(run.cfg.output_dir, BEST_DIR)
        tmp = f"{best}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # Hard links: the copy costs no disk, and survives the rotation that deletes the original's names.
        shutil.copytree(ckpt, tmp, copy_function=_link_or_copy)
        write_json(os.path.join(tmp, "best.json"), {"step": done, "fid": run.quality.best_fid, "checkpoint": ckpt})
        shutil.rmtree(best, ignore_errors=True)
        os.replace(tmp, best)
        run.log(f"step {done}: lowest FID so far ({run.quality.best_fid:.4f}); kept in {best}")
    acc.wait_for_everyone()


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def checkpoint_entry(run):
    """The ``quality`` entry of a checkpoint's train state ({} when nothing is measured)."""
    return {} if run.quality is None else {"quality": run.quality.state_dict()}


# --- the end of a run ------------------------------------------------------------------------

@torch.no_grad()
def ema_eval_loss(run):
    """The first EMA's loss on the fixed held-out batch (the raw weights' is ``eval_loss``)."""
    cfg, acc, e = run.cfg, run.accelerator, run.eval_batch
    model = copy.deepcopy(run.raw).eval()
    run.emas[cfg.ema_rates[0]].copy_to(model.parameters())
    with acc.autocast():
        terms = run.diffusion.training_losses(model, e["x"].to(acc.device), e["t"].to(acc.device),
                                              model_kwargs=e["kwargs"], noise=e["noise"].to(acc.device))
    return terms["loss"].float().mean().item()


def summary_lines(run, out):
    """The block printed when a run ends: steps and time, held-out losses, the latest quality
    figures, and where the checkpoint, grids and wandb run are."""
    cfg = run.cfg
    lines = [f"--- run ended ({out['stop_reason']}): step {out['steps']} of {cfg.max_steps}, "
             f"{out['elapsed_seconds']:.1f} s of training ---"]
    raw = out.get("final_eval_loss")
    ema = ema_eval_loss(run) if run.eval_batch is not None else None
    lines.append(f"held-out loss (fixed batch): EMA {_fmt(ema)}, raw {_fmt(raw)}")
    if run.quality is not None and run.quality.history:
        last = run.quality.history[-1]
        lines.append(f"sample quality at step {last['step']} ({cfg.fid_num_samples} samples): {figures_line(last)}")
        lines.append(f"measuring sample quality took {run.quality.seconds:.1f} s of the training loop's "
                     f"{out['elapsed_seconds']:.1f} s, and {run.quality.prepare_seconds:.1f} s before the first step")
        if run.quality.best_step is not None:
            lines.append(f"lowest FID {run.quality.best_fid:.4g} at step {run.quality.best_step}"
                         + (f" (kept in {os.path.join(cfg.output_dir, BEST_DIR)})" if cfg.keep_best_fid else ""))
    lines.append(f"checkpoint: {out['checkpoint'] or 'none'}")
    lines.append(f"sample grids: {os.path.dirname(out['samples']) if out['samples'] else 'none'}")
    if out.get("wandb_dir"):
        lines.append(f"wandb run: {out['wandb_dir']}")
    return lines


def figures_line(row):
    """A row's ``eval/*`` figures as "fid 1.23, kid ...", for the log."""
    return ", ".join(f"{k[5:]} {v:.4g}" for k, v in row.items() if k.startswith("eval/"))


def _fmt(v):
    return "not measured" if v is None else f"{v:.4f}"


def print_summary(run, out):
    """``summary_lines`` on the main process; the others compute nothing."""
    if run.accelerator.is_main_process:
        run.log("\n".join(summary_lines(run, out)))

