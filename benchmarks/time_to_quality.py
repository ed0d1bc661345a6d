"""
Time to quality: how good the default digits model is after 2, 4, 8 minutes of training and
at the end of its full run, judged by the digit judge (``unet.evaluation.judge``: a real-digit
classifier's accuracy on the requested labels, and the Frechet distance in its features
against the held-out digits, beside the real-vs-real floor).

    python -m benchmarks.time_to_quality --budgets 2,4,8 --json ttq.json --output_dir outputs/ttq
    python -m benchmarks.time_to_quality --budgets 2,4,8 --no_full --json ttq_lr1e-3.json \\
        --output_dir outputs/ttq_lr1e-3 --lr 1e-3            # any training key, as train.py takes it
    python -m benchmarks.time_to_quality plot ttq.json ttq_lr1e-3.json --out curve.png
    python -m benchmarks.time_to_quality judge CKPT_A CKPT_B --judge_seeds 3,4,5,6 --json j.json   # judge again, paired

How: one run, stopped at each budget by the ``max_minutes`` key and resumed from that stop's
checkpoint with the next budget (``max_minutes`` counts the training loop's wall time over
resumes). The default lr is constant after warm-up and nothing else in the schedule looks at
``max_steps`` or the budget, and a resume is bit-identical to a straight run, so the model at
each stop is the one a separate run with that budget would give (same steps for the same
clock), for the machine time of the longest budget alone. After each stop the checkpoint's
EMA weights (as ``sample.py`` samples them) draw ``--judge_samples`` digits, labels 0-9 in
turn, once per ``--judge_seeds`` seed; the spread over seeds is the judge's sampling noise.
Sampling and judging are timed apart and never count towards a budget.

Writes a JSON (machine, torch, command, config, one row per budget) and prints a table.
Bad arguments are one line and exit status 2.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

from benchmarks.machine import cpu_name
from unet.config import ConfigError, TrainConfig, load_config
from unet.utils.jsonfile import write_json


def machine():
    """The CPU's model name and its core count: what the timings belong to."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}


def parse_list(text, flag, kind):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} needs at least one value")
    return values


def parse_sampler(text):
    """``"ddpm:100"`` -> ("ddpm", 100)."""
    from unet.sample.sampling import SCHEDULERS

    name, _, steps = text.partition(":")
    if name not in SCHEDULERS or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"--judge_sampler takes SCHEDULER:STEPS with SCHEDULER one of {', '.join(SCHEDULERS)}, "
                         f"got {text!r}")
    return name, int(steps)


def build_parser():
    p = argparse.ArgumentParser(description="Quality of the digits model against training wall time. Arguments "
                                "it does not know are training keys (--key value, as train.py takes them).")
    p.add_argument("--budgets", default="2,4,8", help="training minutes, comma-separated (default 2,4,8)")
    p.add_argument("--no_full", action="store_true", help="stop at the last budget (default: then train to max_steps)")
    add_judge_args(p)
    return p


def add_judge_args(p):
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--judge_samples", type=int, default=500)
    p.add_argument("--judge_seeds", default="0,1,2", help="sampling seeds per checkpoint (their spread: judge noise)")
    p.add_argument(
        "--judge_sampler", default="ddpm:100", help="SCHEDULER:STEPS (default ddpm:100, the training grid's)"
    )
    p.add_argument("--judge_batch", type=int, default=250)


def check_judge_args(args):
    """Parse and check the judge's arguments (and that --json can be written) in place."""
    args.judge_seeds = parse_list(args.judge_seeds, "--judge_seeds", int)
    if any(s < 0 for s in args.judge_seeds):
        raise ValueError(f"--judge_seeds must be >= 0, got {args.judge_seeds}")
    args.judge_sampler = parse_sampler(args.judge_sampler)
    if args.judge_samples < 2 or args.judge_batch < 1:
        raise ValueError("--judge_samples must be at least 2 (the Frechet distance fits a covariance) "
                         "and --judge_batch at least 1")
    if args.json:
        from unet.cli.evaluate import check_output_file

        check_output_file(args.json, "--json")


def parse_args(argv):
    """(benchmark args, the run's TrainConfig); every check before any training."""
    args, rest = build_parser().parse_known_args(argv)
    args.budgets = sorted(parse_list(args.budgets, "--budgets", float))
    if any(not 0 < b < 1e6 for b in args.budgets):
        raise ValueError(f"--budgets must be minutes > 0, got {args.budgets}")
    check_judge_args(args)
    # Tracking and the progress bar do not change the model; off unless asked for. Every
    # checkpoint is kept, so that each stop's model can be judged again later.
    cfg = load_config(["--report_to", "none", "--progress", "false", "--keep_checkpoints", "1000", *rest])
    if cfg.max_minutes:
        raise ValueError("--max_minutes is set by the benchmark from --budgets; leave it out")
    if cfg.resume:
        raise ValueError("--resume: the benchmark starts its own run (use a fresh --output_dir or --overwrite true)")
    return args, cfg


def judge(checkpoint, args):
    """Digit quality of ``checkpoint``'s EMA samples, once per judge seed."""
    from unet.checkpoint.load import load_checkpoint
    from unet.evaluation.judge import digit_quality
    from unet.evaluation.quality import judge_reference
    from unet.sample.sampling import generate

    loaded = load_checkpoint(checkpoint)  # the first EMA rate, as sample.py
    reference = judge_reference(TrainConfig.from_dict(loaded.config))  # the digits', or the MNIST family's
    name, steps = args.judge_sampler
    labels = list(range(loaded.model.num_classes)) if loaded.model.num_classes else None
    rows = []
    for seed in args.judge_seeds:
        start = time.perf_counter()
        images, y = generate(loaded.model, loaded.diffusion_kwargs, loaded.image_size, args.judge_samples, name,
                             steps, args.judge_batch, seed, labels, progress=False)
        sampled = time.perf_counter() - start
        # One judge and one floor for every seed: only the samples vary.
        q = digit_quality(images, y, seed=0, reference=reference)
        rows.append(dict(seed=seed, accuracy=q.get("accuracy"), fd=q["fd"], fd_floor=q["fd_floor"],
                         confidence=q["confidence"], sampling_seconds=sampled,
                         judge_seconds=time.perf_counter() - start - sampled))
    return rows


def mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def point(budget, summary, rows):
    """One row of the curve: the stop's steps and clock, the judge's per-seed and summary numbers."""
    acc, fd = mean_sd([r["accuracy"] for r in rows]), mean_sd([r["fd"] for r in rows])
    return dict(budget_minutes=budget, steps=summary["steps"], train_seconds=summary["elapsed_seconds"],
                stop_reason=summary["stop_reason"], checkpoint=summary["checkpoint"],
                accuracy=acc[0], accuracy_sd=acc[1], fd=fd[0], fd_sd=fd[1], fd_floor=rows[0]["fd_floor"],
                judging_seconds=sum(r["sampling_seconds"] + r["judge_seconds"] for r in rows), per_seed=rows)


def run_curve(args, cfg, log=print):
    """Train segment by segment (one per budget, then to max_steps unless --no_full), judging
    each stop's checkpoint; returns the rows."""
    from unet.train.loop import TrainingError, train

    stops = [*args.budgets, *([] if args.no_full else [None])]
    points, summary = [], None
    for i, budget in enumerate(stops):
        if summary is None or summary["stop_reason"] == "max_minutes":
            seg = cfg.replace(max_minutes=budget or 0.0, resume="latest" if i else "",
                              overwrite=cfg.overwrite if not i else False)
            summary = train(seg)
            if summary["stop_reason"] not in ("max_minutes", "max_steps"):
                raise TrainingError(f"training stopped ({summary['stop_reason']}) at step {summary['steps']}: "
                                   f"{summary['divergence_reason']}")
            rows = judge(summary["checkpoint"], args)
        # A run that reached max_steps before this budget: the same (final) model.
        points.append(point(budget, summary, rows))
        p = points[-1]
        log(f"{budget_name(budget)}: step {p['steps']}, {p['train_seconds']:.0f} s of training, "
            f"accuracy {p['accuracy']:.3f}, Frechet distance {p['fd']:.3f} (floor {p['fd_floor']:.3f})")
    return points


def budget_name(minutes):
    return "full run" if minutes is None else f"{minutes:g} min"


def format_table(points):
    head = ("| budget | steps | training s | accuracy (mean ± sd over seeds) | Frechet distance (mean ± sd) | floor |\n"
            "|---|---|---|---|---|---|")
    body = [f"| {budget_name(p['budget_minutes'])} | {p['steps']} | {p['train_seconds']:.0f} | "
            f"{p['accuracy']:.3f} ± {p['accuracy_sd']:.3f} | {p['fd']:.3f} ± {p['fd_sd']:.3f} | {p['fd_floor']:.3f} |"
            for p in points]
    return "\n".join([head, *body])


def judge_settings(args, ema_rate):
    return dict(samples=args.judge_samples, seeds=args.judge_seeds, sampler=list(args.judge_sampler),
                labels="0-9 in turn", weights=f"EMA {ema_rate:g}", judge_seed=0)


def measure(argv):
    args, cfg = parse_args(argv)
    import torch

    start = time.perf_counter()
    points = run_curve(args, cfg)
    out = dict(machine=machine(), torch=torch.__version__, threads=torch.get_num_threads(),
               command="python -m benchmarks.time_to_quality " + " ".join(argv), config=cfg.to_dict(),
               budgets_minutes=args.budgets, full=not args.no_full,
               judge=judge_settings(args, cfg.ema_rates[0]),
               points=points, wall_seconds=time.perf_counter() - start)
    print(format_table(points))
    if args.json:
        write_json(args.json, out, indent=1)
    return out


def paired(rows, first, key):
    """``rows`` minus ``first`` in ``key``, seed by seed (the same seed draws the same labels
    and noise for both): the differences and their mean with its 95% t half-width."""
    from unet.utils.stats import paired_differences, t_interval

    diffs = paired_differences({r["seed"]: r[key] for r in rows}, {f["seed"]: f[key] for f in first})
    mean, half = t_interval(diffs)
    return dict(mean=mean, half_width=half, per_seed=diffs)


def rejudge(argv):
    """
    Judge kept checkpoints (again), e.g. with more sampling seeds than a curve had: each
    checkpoint's per-seed numbers, and each one's seed-paired difference from the first.

        python -m benchmarks.time_to_quality judge CKPT_A CKPT_B --judge_seeds 0,1,2,3,4,5 --json F
    """
    p = argparse.ArgumentParser(prog="time_to_quality.py judge")
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders (or run output_dirs: their latest)")
    add_judge_args(p)
    args = p.parse_args(argv)
    check_judge_args(args)
    for c in args.checkpoints:
        if not os.path.isdir(c):
            raise ValueError(f"checkpoint not found: {c}")
    import torch

    from unet.checkpoint.load import load_checkpoint

    start = time.perf_counter()
    judged = []
    for c in args.checkpoints:
        rows = judge(c, args)
        acc, fd = mean_sd([r["accuracy"] for r in rows]), mean_sd([r["fd"] for r in rows])
        judged.append(dict(checkpoint=c, accuracy=acc[0], accuracy_sd=acc[1], fd=fd[0], fd_sd=fd[1], per_seed=rows))
        print(f"{c}: accuracy {acc[0]:.4f} ± {acc[1]:.4f}, Frechet distance {fd[0]:.3f} ± {fd[1]:.3f} "
              f"({len(rows)} seeds)")
    first = judged[0]["per_seed"]
    for j in judged[1:]:
        j["minus_first"] = {k: paired(j["per_seed"], first, k) for k in ("accuracy", "fd")}
        a, f = j["minus_first"]["accuracy"], j["minus_first"]["fd"]
        print(f"{j['checkpoint']} minus {judged[0]['checkpoint']}, paired by seed: accuracy "
              f"{a['mean']:+.4f} ± {a['half_width']:.4f}, Frechet distance {f['mean']:+.3f} ± {f['half_width']:.3f} "
              "(95% t half-widths)")
    out = dict(machine=machine(), torch=torch.__version__, threads=torch.get_num_threads(),
               command="python -m benchmarks.time_to_quality judge " + " ".join(argv),
               judge=judge_settings(args, load_checkpoint(args.checkpoints[0]).config["ema_rates"][0]),
               checkpoints=judged,
               wall_seconds=time.perf_counter() - start)
    if args.json:
        write_json(args.json, out, indent=1)
    return out


def plot(argv):
    """Accuracy and Frechet distance against training minutes, one line per JSON."""
    p = argparse.ArgumentParser(prog="time_to_quality.py plot")
    p.add_argument("jsons", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_f) = plt.subplots(1, 2, figsize=(9, 3.4))
    floor = None
    for path in args.jsons:
        with open(path) as fh:
            d = json.load(fh)
        pts, cfg = d["points"], d["config"]
        label = (f"lr {cfg['lr']:g}, {cfg['max_steps']} steps, batch {cfg['batch_size']}, EMA {cfg['ema_rates'][0]:g}, "
                 f"{cfg['schedule_sampler']}")
        x = [q["train_seconds"] / 60 for q in pts]
        ax_a.errorbar(x, [q["accuracy"] for q in pts], [q["accuracy_sd"] for q in pts], marker="o", capsize=3,
                      label=label)
        ax_f.errorbar(x, [q["fd"] for q in pts], [q["fd_sd"] for q in pts], marker="o", capsize=3, label=label)
        floor = pts[0]["fd_floor"]
    ax_f.axhline(floor, color="grey", ls="--", lw=1, label="real-vs-real floor")
    ax_a.set(xlabel="training minutes", ylabel="accuracy on requested labels")
    ax_f.set(xlabel="training minutes", ylabel="Frechet distance (judge features)")
    ax_f.legend(fontsize=7)
    fig.suptitle("digit judge against training wall time (error bars: sd over sampling seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["plot"]:
            return plot(argv[1:])
        if argv[:1] == ["judge"]:
            rejudge(argv[1:])
            return 0
        measure(argv)
    except (ConfigError, ValueError) as e:  # bad arguments; also a CheckpointError or DataError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # training stopped on a non-finite or diverging loss
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
