"""
Evaluating a trained model from the command line: bits/dim and the training loss on
held-out data (``unet.held_out``), sample quality on the digits, FID for RGB data, and a
benchmark of the samplers.

    python -m unet.evaluate bpd --checkpoint outputs/digits
    python -m unet.evaluate loss --checkpoint outputs/run_a --checkpoint outputs/run_b   # paired by draw
    python -m unet.evaluate quality --samples samples/samples.npz
    python -m unet.evaluate fid --samples samples/samples.npz --ref path/to/real/images
    python -m unet.evaluate benchmark --checkpoint outputs/digits --num_samples 200
    python -m unet.evaluate benchmark --checkpoint outputs/digits-cfg --runs ddpm:100 --guidance 0,1,2,3 --seeds 4 --json rows.json
    python -m unet.evaluate summary --rows rows.json

Digit quality (accuracy of a small real-digit classifier, Frechet distance in its
features) is ``unet.digit_quality``'s.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from accelerate import Accelerator

from .checkpoint import load_checkpoint
from .digit_quality import check_sample_count, digit_quality, format_quality
from .images import to_pil
from .jsonfile import write_json
from .held_out import bits_per_dim, held_out_data, held_out_losses, paired_report
from .sampling import SCHEDULERS, check_guidance, check_seed, check_steps, generate, null_class_label
from .stats import finite, paired_differences, t_interval

# --- FID for RGB ---------------------------------------------------------------------

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def fid_unavailable_reason(weights=None):
    """None when torch-fidelity and its Inception weights are present, else why not (one line)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return "FID skipped: torch-fidelity is not installed (pip install torch-fidelity; it needs torchvision)"
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if not os.path.isfile(path):
        return (f"FID skipped: torch-fidelity's Inception weights are not at {path} and this machine has no "
                f"network to fetch them; copy {INCEPTION_FILE} there or pass --inception_weights")
    return None


def fid(images, ref_dir, weights=None):
    """FID of NHWC uint8 ``images`` against the images in ``ref_dir``, by torch-fidelity.
    :return: (fid or None, one-line reason when None)."""
    reason = fid_unavailable_reason(weights)
    if reason:
        return None, reason
    import torch_fidelity

    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(images):
            to_pil(img).convert("RGB").save(os.path.join(tmp, f"{i:06d}.png"))
        kwargs = {"feature_extractor_weights_path": weights} if weights else {}
        metrics = torch_fidelity.calculate_metrics(input1=tmp, input2=ref_dir, fid=True, verbose=False, **kwargs)
    return float(metrics["frechet_inception_distance"]), None


# --- benchmark -----------------------------------------------------------------------

DEFAULT_RUNS = "ddpm:full,ddpm:100,ddim:50,dpm-solver++:20,dpm-solver++:10"


def parse_runs(spec, total_steps):
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


def parse_guidance(spec, loaded):
    """``"0,1,2"`` -> [0.0, 1.0, 2.0], each checked against the model (``sampling.check_guidance``)."""
    try:
        scales = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--guidance takes numbers such as '1' or '0,1,2,3', got {spec!r}") from None
    if not scales:
        raise ValueError("--guidance needs at least one scale, e.g. '1' or '0,1,2,3'")
    for w in scales:
        check_guidance(w, loaded.model.num_classes, null_class_label(loaded.config))
    return scales


def benchmark(loaded, runs, num_samples, batch_size=256, seeds=(0,), guidance_scales=(1.0,)):
    """Images/s and digit quality of each (scheduler, steps) at each guidance scale and seed;
    within a seed every row has the same labels and initial noise. A seed also draws the real
    digits the Frechet distance is measured against, so rows of different seeds differ in all
    the randomness a reader's rerun would."""
    null = null_class_label(loaded.config)
    rows = []
    for seed in seeds:
        for name, steps in runs:
            for w in guidance_scales:
                start = time.perf_counter()
                images, labels = generate(loaded.model, loaded.diffusion_kwargs, loaded.image_size, num_samples, name,
                                          steps, batch_size, seed, progress=False, guidance_scale=w, null_label=null)
                seconds = time.perf_counter() - start
                rows.append(dict(scheduler=name, steps=steps, guidance_scale=w, seed=seed, images_per_s=num_samples / seconds,
                                 seconds=seconds, **digit_quality(images, labels, seed=seed)))
    return rows


SEED_MEASURES = ("fd", "fd_floor", "accuracy", "confidence")


def summarize_seeds(rows):
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
        lines.append(f"| {d['scheduler']} | {d['steps']} | {d['guidance_scale']:g} | {d['fd']:+.2f} ± {d['fd_ci']:.2f} | "
                     f"{d['accuracy']:+.3f} ± {d['accuracy_ci']:.3f} | {len(d['seeds'])} |")
    return "\n".join(lines)


def format_table(rows):
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


def check_output_file(path, flag):
    """Refuse, before any work, an output file that is a folder or whose folder is missing or
    read-only."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path} is not writable")


# --- command line --------------------------------------------------------------------

def _load_samples(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples not found: {path}")
    try:
        with np.load(path) as f:
            return f["arr_0"], (f["arr_1"] if "arr_1" in f else None)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read samples {path} (expected sample.py's samples.npz): {e}") from None


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a trained model or its samples.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bpd", help="bits/dim on the held-out split")
    held_out_args(b)
    h = sub.add_parser("loss", help="the training loss (L_hybrid: mse + vb) on the held-out split, over many draws of t")
    held_out_args(h)
    h.add_argument("--draws", type=int, default=16, help="passes over the held-out images, each with new t and noise")
    q = sub.add_parser("quality", help="digit sample quality (classifier accuracy, Frechet distance)")
    q.add_argument("--samples", required=True, help="samples.npz written by sample.py")
    q.add_argument("--json", action="store_true")
    f = sub.add_parser("fid", help="FID of RGB samples by torch-fidelity, when its weights are present")
    f.add_argument("--samples", required=True)
    f.add_argument("--ref", required=True, help="folder of real images")
    f.add_argument("--inception_weights", default=None)
    m = sub.add_parser("benchmark", help="images/s and digit quality for several samplers")
    m.add_argument("--checkpoint", required=True)
    m.add_argument("--num_samples", type=int, default=200)
    m.add_argument("--batch_size", type=int, default=256)
    m.add_argument("--runs", default=DEFAULT_RUNS)
    m.add_argument("--guidance", default="1", help="classifier-free guidance scales, e.g. '0,1,2,3' (each run at each "
                   "scale; needs a model trained with class_dropout_prob > 0 for scales other than 1)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--seeds", type=int, default=1, help="repeat everything with seeds seed .. seed+N-1 and print each "
                   "measure's mean over them with its 95%% t-interval (the JSON keeps every seed's rows)")
    m.add_argument("--json", default=None, help="also write the rows to this file")
    r = sub.add_parser("summary", help="the over-seeds tables of saved 'benchmark --json' rows (no sampling)")
    r.add_argument("--rows", required=True, help="JSON rows written by 'benchmark --json', of one or more seeds")
    return p


def held_out_args(p):
    p.add_argument("--checkpoint", required=True, action="append",
                   help="repeat to compare checkpoints: each against the first, paired (same images and noise)")
    p.add_argument("--num_images", type=int, default=0, help="first N held-out images (0: all)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--raw", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def load_held_out(args):
    """Every checkpoint (checked before any is evaluated) and the first one's held-out split."""
    for c in args.checkpoint:
        if os.path.isfile(c):
            raise ValueError(f"{c}: held-out measures need a checkpoint of this package (its config names the data)")
    check_seed(args.seed)
    if args.num_images < 0 or args.batch_size < 1:
        raise ValueError("--num_images must be >= 0 (0: all) and --batch_size >= 1")
    loaded = [load_checkpoint(c, ema=not args.raw) for c in args.checkpoint]
    images, labels = held_out_data(loaded[0].config)
    if args.num_images:
        images, labels = images[:args.num_images], labels[:args.num_images]
    return loaded, images, labels


def run_bpd(args):
    loaded, images, labels = load_held_out(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    bpd = [bits_per_dim(m.model.to(accelerator.device), m.diffusion(timestep_respacing=""), images, labels,
                        args.batch_size, args.seed, accelerator) for m in loaded]
    if accelerator.is_main_process:
        print("\n".join(paired_report(args.checkpoint, bpd, "bits/dim", "held-out images")))


def run_loss(args):
    if args.draws < 2:
        raise ValueError(f"--draws must be at least 2 (the spread over draws is the error), got {args.draws}")
    loaded, images, labels = load_held_out(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if not accelerator.is_main_process:  # not split across processes: one of them measures it all
        return
    terms = [held_out_losses(m.model.to(accelerator.device), m.diffusion(timestep_respacing=""), images, labels,
                             args.draws, args.seed, args.batch_size) for m in loaded]
    for term in sorted(terms[0], key=lambda k: (k != "loss", k)):  # the objective first, then its parts
        print("\n".join(paired_report(args.checkpoint, [t[term] for t in terms], f"held-out {term}", "draws")))


def run_fid(args):
    images, _ = _load_samples(args.samples)
    if not os.path.isdir(args.ref):
        raise FileNotFoundError(f"reference folder not found: {args.ref}")
    value, reason = fid(images, args.ref, args.inception_weights)
    print(reason if value is None else f"FID: {value:.3f}")


def run_benchmark(args):
    if args.json:
        check_output_file(args.json, "--json")
    check_sample_count(args.num_samples)
    check_seed(args.seed)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.seed + args.seeds - 1 >= 2 ** 63:  # the last seed must be one check_seed accepts
        raise ValueError(f"--seed {args.seed} with --seeds {args.seeds} goes past the largest seed, 2**63 - 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    loaded = load_checkpoint(args.checkpoint)
    runs = parse_runs(args.runs, loaded.diffusion_kwargs.get("steps", 1000))
    scales = parse_guidance(args.guidance, loaded)
    rows = benchmark(loaded, runs, args.num_samples, args.batch_size, range(args.seed, args.seed + args.seeds), scales)
    if args.json:
        write_json(args.json, rows, indent=1)
    print(format_table(rows) if args.seeds == 1 else format_seed_summary(rows))


def format_seed_summary(rows):
    """The mean-over-seeds table and, when the rows have W = 1 and other scales, the paired
    differences from W = 1."""
    diffs = guidance_differences(rows)
    return format_table(summarize_seeds(rows)) + (f"\n\n{format_differences(diffs)}" if diffs else "")


def read_rows(path):
    """Rows of ``benchmark --json``, or a one-line error."""
    try:
        with open(path) as fh:
            rows = json.load(fh)
        assert isinstance(rows, list) and all({"scheduler", "steps", "fd", "fd_floor", "images_per_s"} <= set(r) for r in rows)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (OSError, ValueError, AssertionError, TypeError):
        raise ValueError(f"{path}: expected the JSON rows of 'unet.evaluate benchmark --json'") from None
    return rows


def run_summary(args):
    print(format_seed_summary(read_rows(args.rows)))


def run_quality(args):
    q = digit_quality(*_load_samples(args.samples))
    print(json.dumps(q) if args.json else format_quality(q))


COMMANDS = dict(bpd=run_bpd, loss=run_loss, quality=run_quality, fid=run_fid, benchmark=run_benchmark, summary=run_summary)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")  # one line, exit status 2 as for argparse's own errors


if __name__ == "__main__":
    main()
