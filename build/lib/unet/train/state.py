"""
What a training run carries from step to step, and the rules that read it: the record of
one optimizer step, the run's counters, when to stop, and what a log line holds. Plain data
and pure functions (no accelerate, no model), so tests call the rules directly.
"""

import math
from dataclasses import dataclass, field

from .diagnostics import DivergenceMonitor, SpikeDetector

NAN = float("nan")
LOSS_TERMS = ("loss", "mse", "vb")  # the diffusion's loss terms, as ``training_losses`` names them


@dataclass
class StepRecord:
    """
    What one optimizer step measured. ``as_dict()`` is its row in the run's history (what
    hooks receive and the result's ``history`` holds).

    :param step: the step number, 1-based (steps done after it).
    :param lr: the learning rate after the step.
    :param skipped: True when a non-finite loss or gradient made the step a no-op.
    :param terms: the global batch's mean loss, mse and vb, and their per-quartile means
        (``loss_q0``..``vb_q3``); empty for a skipped step.
    :param grad_norm: the global gradient norm before clipping (None for a skipped step).
    :param measures: diagnostics and held-out losses, where measured at this step.
    """

    step: int
    lr: float
    skipped: bool = False
    terms: dict = field(default_factory=dict)
    grad_norm: float = None
    measures: dict = field(default_factory=dict)
    spike: bool = False
    spike_count: int = 0
    nan_skipped: int = 0
    divergence: str = None  # the divergence rule's verdict on this step (None: fine)

    @property
    def loss(self):
        return self.terms.get("loss", NAN)

    def as_dict(self):
        row = {"step": self.step}
        if self.skipped:
            row.update(loss=NAN, skipped=True, lr=self.lr)
        else:
            row.update(self.terms, grad_norm=self.grad_norm, lr=self.lr, spike=self.spike)
        row.update(spike_count=self.spike_count, nan_skipped=self.nan_skipped, **self.measures)
        return row


@dataclass
class TrainState:
    """
    The counters and detectors of a run; ``state_dict()`` is what a checkpoint's
    ``train_state.json`` holds about them (together with the sampler's and the EMAs' state).

    :param divergence: the divergence rule (``cfg.divergence_factor``, ``cfg.divergence_window``).
    """

    divergence: DivergenceMonitor
    step: int = 0
    nan_skipped: int = 0
    nan_streak: int = 0
    elapsed: float = 0.0  # seconds of the training loop so far, summed over resumes (what max_minutes reads)
    spikes: SpikeDetector = field(default_factory=SpikeDetector)
    # not saved: this call's history, files written, and the current log window's throughput
    history: list = field(default_factory=list)
    last_checkpoint: str = None
    last_samples: str = None
    window_seconds: float = 0.0
    window_images: int = 0

    def observe(self, record, check_grad_norm=True):
        """
        Count the step and fill in the record's spike, counters and divergence verdict.

        :param check_grad_norm: False where a non-finite gradient is not a bad step (fp16's
            grad scaler skips it and lowers its scale).
        """
        if record.skipped:
            self.nan_skipped += 1
            self.nan_streak += 1
        else:
            self.nan_streak = 0
            record.spike = bool(self.spikes.update(record.loss))
        record.spike_count, record.nan_skipped = self.spikes.count, self.nan_skipped
        # A skipped step's loss is NaN, so it counts as divergence even at step 1.
        record.divergence = self.divergence.update(record.loss, record.grad_norm if check_grad_norm else None)
        return record

    def state_dict(self):
        return {"step": self.step, "nan_skipped": self.nan_skipped, "nan_streak": self.nan_streak,
                "spikes": self.spikes.state_dict(),
                "divergence": self.divergence.state_dict(), "elapsed_seconds": self.elapsed}

    def load_state_dict(self, state):
        self.step, self.nan_skipped, self.nan_streak = state["step"], state["nan_skipped"], state["nan_streak"]
        self.elapsed = state["elapsed_seconds"]
        self.spikes.load_state_dict(state["spikes"])
        self.divergence.load_state_dict(state["divergence"])


def should_stop(state, record, cfg, hook=False, signalled=False):
    """
    Why the run stops after ``record``'s step, first rule first: "nan" (``max_nan_steps``
    skipped steps in a row), "diverged" (``divergence_factor`` > 0 and the divergence rule
    fired), "hook" (a hook asked to stop), "max_steps", "max_minutes" (``max_minutes`` > 0 and
    ``state.elapsed`` has reached it), "preempted" (a stop signal arrived: ``signalled``), or
    None to go on. The last step is "max_steps" (or "max_minutes") even when signalled: the
    run is complete.
    """
    if state.nan_streak >= cfg.max_nan_steps:
        return "nan"
    if cfg.divergence_factor and record.divergence:
        return "diverged"
    if hook:
        return "hook"
    if record.step >= cfg.max_steps:
        return "max_steps"
    if cfg.max_minutes and state.elapsed >= 60 * cfg.max_minutes:
        return "max_minutes"
    if signalled:
        return "preempted"
    return None


def stop_message(reason, record, cfg):
    """The one line that says why a run diverged (None for a normal stop)."""
    if reason == "nan":
        return f"{cfg.max_nan_steps} non-finite losses in a row"
    return record.divergence if reason == "diverged" else None


def finite_mean(values):
    """Mean of the finite values (skipped steps log NaN), NaN if there are none."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else NAN


def log_window(rows, images_per_sec):
    """
    What one log line holds, from the window's history rows (the last row is the step
    logged): loss terms averaged over the window's finite values (skipped steps
    left out), everything else as of the last row, and the diagnostics measured in the window.

    :param rows: ``StepRecord.as_dict()`` rows, oldest first.
    :param images_per_sec: training throughput over the window.
    """
    last = rows[-1]
    logged = {f"train/{k}": finite_mean([r.get(k) for r in rows]) for k in last if k.startswith(LOSS_TERMS)}
    if "update_to_weight" in last:
        logged["stability/update_to_weight"] = last["update_to_weight"]
    logged.update({"train/grad_norm": last.get("grad_norm", NAN), "train/lr": last["lr"],
                   "train/images_per_sec": images_per_sec, "stability/spike_count": last["spike_count"],
                   "stability/nan_skipped": last["nan_skipped"]})
    for k in ("eval_loss", "eval_mse", "eval_vb"):
        if k in last:
            logged[f"eval/{k[5:]}"] = last[k]
    for r in rows:
        for name, v in r.get("residual_ratios", {}).items():
            logged[f"stability/residual_ratio/{name}"] = v
        for i, (name, v) in enumerate(r.get("activation_rms", [])):
            logged[f"stability/activation_rms/{i:02d}_{name}"] = v
    return logged
