"""
Evaluate a trained model or its samples: bits/dim and the training loss on held-out data,
digit quality, FID for RGB data, and the samplers' quality and speed.

    python evaluate.py bpd --checkpoint outputs/digits
    python evaluate.py loss --checkpoint outputs/run_a --checkpoint outputs/run_b   # paired by draw
    python evaluate.py quality --samples samples/samples.npz
    python evaluate.py fid --samples samples/samples.npz --ref path/to/real/images
    python evaluate.py benchmark --checkpoint outputs/digits --num_samples 200
    python evaluate.py benchmark --checkpoint outputs/digits-cfg --runs ddpm:100 --guidance 0,1,2,3 --seeds 4 \
        --json rows.json
    python evaluate.py summary --rows rows.json

(``python -m unet.evaluate ...`` is the same command.) Bad input is one line on stderr and
exit status 2.
"""

import argparse
import json
import os

import numpy as np

from unet.evaluation.fid import fid
from unet.evaluation.held_out import bits_per_dim, held_out_data, held_out_losses, paired_report
from unet.evaluation.judge import check_sample_count, digit_quality, format_quality
from unet.evaluation.samplers import (
    DEFAULT_RUNS,
    benchmark,
    format_seed_summary,
    format_table,
    parse_guidance,
    parse_runs,
    read_rows,
)
from unet.sample.sampling import check_seed
from unet.train.checkpoint import load_checkpoint
from unet.utils.devices import device_accelerator
from unet.utils.jsonfile import write_json


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
    h = sub.add_parser(
        "loss", help="the training loss (L_hybrid: mse + vb) on the held-out split, over many draws of t"
    )
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
    accelerator = device_accelerator()
    bpd = [bits_per_dim(m.model.to(accelerator.device), m.diffusion(timestep_respacing=""), images, labels,
                        args.batch_size, args.seed, accelerator) for m in loaded]
    if accelerator.is_main_process:
        print("\n".join(paired_report(args.checkpoint, bpd, "bits/dim", "held-out images")))


def run_loss(args):
    if args.draws < 2:
        raise ValueError(f"--draws must be at least 2 (the spread over draws is the error), got {args.draws}")
    loaded, images, labels = load_held_out(args)
    accelerator = device_accelerator()
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


def run_summary(args):
    print(format_seed_summary(read_rows(args.rows)))


def run_quality(args):
    q = digit_quality(*_load_samples(args.samples))
    print(json.dumps(q) if args.json else format_quality(q))


COMMANDS = dict(
    bpd=run_bpd, loss=run_loss, quality=run_quality, fid=run_fid, benchmark=run_benchmark, summary=run_summary
)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")  # one line, exit status 2 as for argparse's own errors


if __name__ == "__main__":
    main()
