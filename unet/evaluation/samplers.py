"""
Sample quality per sampler: images/s and the digit judge's measures for each (scheduler,
steps, guidance scale) over seeds, their over-seed summaries and paired guidance differences,
and the JSON rows that ``evaluate.py benchmark --json`` writes and the export's model card reads.
"""

import json
import time
from collections.abc import Iterable, Sequence

import numpy as np

from unet.checkpoint.load import Loaded
from unet.sample.sampling import SCHEDULERS, check_guidance, check_steps, generate
from unet.utils.stats import finite, paired_differences, t_interval

from .judge import DigitReference, digit_quality

ROW_KEYS = frozenset(("scheduler", "steps", "fd", "fd_floor", "images_per_s"))

DEFAULT_RUNS = "ddpm:full,ddpm:100,ddim:50,dpm-solver++:20,dpm-solver++:10"


def parse_runs(spec: str, total_steps: int) -> list[tuple[str, int]]:
    """``"ddpm:full,ddim:50"`` -> [("ddpm", T), ("ddim", 50)]."""
    runs = []
    for item in spec.split(","):
        name, _, steps = item.strip().partition(":")
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r} in --runs; valid: {', '.join(SCHEDULERS)}")
        if steps not in ("", "full") and not steps.isdigit():
            raise ValueError(f"--runs {item.strip()!r}: steps must be a whole number or 'full'")
        n = total_steps if steps in ("", "full") else int(steps)
        check_steps(n, dict(steps=total_steps))
        runs.append((name, n))
    return runs


def parse_guidance(spec: str, loaded: Loaded) -> list[float]:
    """``"0,1,2"`` -> [0.0, 1.0, 2.0], each checked against the model (``sampling.check_guidance``)."""
    try:
        scales = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--guidance takes numbers such as '1' or '0,1,2,3', got {spec!r}") from None
    if not scales:
        raise ValueError("--guidance needs at least one scale, e.g. '1' or '0,1,2,3'")
    for w in scales:
        check_guidance(w, loaded.model.num_classes, loaded.null_label)
    return scales


def benchmark(loaded: Loaded, runs: Sequence[tuple[str, int]], num_samples: int, batch_size: int = 256,
              seeds: Sequence[int] = (0,), guidance_scales: Sequence[float] = (1.0,), *,
              reference: "DigitReference") -> list[dict]:
    """Images/s and digit quality (against ``reference``, a ``judge.DigitReference``) of each
    (scheduler, steps) at each guidance scale and seed;
    within a seed every row has the same labels and initial noise. A seed also draws the real
    digits the Frechet distance is measured against, so rows of different seeds differ in all
    the randomness a reader's rerun would."""
    null = loaded.null_label
    rows = []
    for seed in seeds:
        for name, steps in runs:
            for w in guidance_scales:
                start = time.perf_counter()
                images, labels = generate(loaded.model, loaded.diffusion_kwargs, loaded.image_size, num_samples, name,
                                          steps, batch_size, seed, progress=False, guidance_scale=w, null_label=null)
                seconds = time.perf_counter() - start
                rows.append(
                    dict(
                        scheduler=name,
                        steps=steps,
                        guidance_scale=w,
                        seed=seed,
                        images_per_s=num_samples / seconds,
                        seconds=seconds,
                        **digit_quality(images, labels, seed=seed, reference=reference),
                    )
                )
    return rows


SEED_MEASURES = ("fd", "fd_floor", "accuracy", "confidence")


def summarize_seeds(rows: Iterable[dict]) -> list[dict]:
    """
    One row per (scheduler, steps, guidance) over the seeds in ``rows``: the median images/s,
    and for each quality measure its mean over seeds and the half-width of its 95% t-interval
    (``<measure>_ci``; NaN with one seed). Seeds are the unit of replication here: one seed's
    500 samples give one value of each measure, whose draw-to-draw spread only seeds show.
    """
    groups = {}
    for r in rows:
        groups.setdefault((r["scheduler"], r["steps"], r.get("guidance_scale", 1.0)), []).append(r)
    out = []
    for (name, steps, w), group in groups.items():
        row = dict(scheduler=name, steps=steps, guidance_scale=w, seeds=[r.get("seed") for r in group],
                   images_per_s=float(np.median([r["images_per_s"] for r in group])))
        for key in SEED_MEASURES:
            row[key], row[f"{key}_ci"] = t_interval(finite([r.get(key) for r in group]))
        out.append(row)
    return out


def guidance_differences(rows, reference=1.0):
    """
    Each guidance scale's change from ``reference`` (no guidance) in Frechet distance and
    accuracy, paired by seed: per seed the two rows share labels, initial noise and reference
    digits, so the per-seed difference is far less noisy than either value. Mean and 95%
    t-interval half-width (``<measure>_ci``) per (scheduler, steps, guidance).
    """
    cells = {(r["scheduler"], r["steps"], r.get("guidance_scale", 1.0), r.get("seed")): r for r in rows}
    out = []
    for name, steps, w in dict.fromkeys(k[:3] for k in cells):
        if w == reference:
            continue
        seeds = [k[3] for k in cells if k[:3] == (name, steps, w) and (name, steps, reference, k[3]) in cells]
        if not seeds:
            continue
        row = dict(scheduler=name, steps=steps, guidance_scale=w, reference=reference, seeds=seeds)
        for key in ("fd", "accuracy"):
            at = {s: cells[(name, steps, w, s)].get(key) for s in seeds}
            ref = {s: cells[(name, steps, reference, s)].get(key) for s in seeds}
            row[key], row[f"{key}_ci"] = t_interval(paired_differences(at, ref))
        out.append(row)
    return out


def format_differences(diffs):
    """Markdown table of ``guidance_differences``."""
    lines = ["| sampler | steps | guidance | Frechet dist. minus at W = 1 | accuracy minus at W = 1 | seeds |",
             "|---|---|---|---|---|---|"]
    for d in diffs:
        lines.append(
            f"| {d['scheduler']} | {d['steps']} | {d['guidance_scale']:g} | {d['fd']:+.2f} ± {d['fd_ci']:.2f} | "
            f"{d['accuracy']:+.3f} ± {d['accuracy_ci']:.3f} | {len(d['seeds'])} |"
        )
    return "\n".join(lines)


def format_table(rows: Iterable[dict]) -> str:
    """Markdown table of benchmark rows, or of ``summarize_seeds`` rows (mean +- 95% interval)."""
    def cell(r, key, digits):
        half = r.get(f"{key}_ci", float("nan"))
        return f"{r.get(key, float('nan')):.{digits}f}" + ("" if half != half else f" ± {half:.{digits}f}")
    head = ("| sampler | steps | guidance | images/s | Frechet dist. (floor) | accuracy | confidence |\n"
            "|---|---|---|---|---|---|---|")
    body = [f"| {r['scheduler']} | {r['steps']} | {r.get('guidance_scale', 1):g} | {r['images_per_s']:.1f} | "
            f"{cell(r, 'fd', 2)} ({r['fd_floor']:.2f}) | {cell(r, 'accuracy', 3)} | {cell(r, 'confidence', 3)} |"
            for r in rows]
    return "\n".join([head, *body])


def format_seed_summary(rows: Sequence[dict]) -> str:
    """The mean-over-seeds table and, when the rows have W = 1 and other scales, the paired
    differences from W = 1."""
    diffs = guidance_differences(rows)
    return format_table(summarize_seeds(rows)) + (f"\n\n{format_differences(diffs)}" if diffs else "")


def read_rows(path: str) -> list[dict]:
    """Rows of ``benchmark --json``, or a one-line error."""
    try:
        with open(path) as fh:
            rows = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (OSError, ValueError):
        rows = None
    # A plain check, not an assert: asserts vanish under python -O.
    if not (isinstance(rows, list) and all(isinstance(r, dict) and ROW_KEYS <= set(r) for r in rows)):
        raise ValueError(f"{path}: expected the JSON rows of 'evaluate.py benchmark --json'")
    return rows
