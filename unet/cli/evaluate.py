"""
Evaluate a trained model or its samples: bits/dim and the training loss on held-out data,
digit quality, FID for RGB data, and the samplers' quality and speed.

    python evaluate.py bpd --checkpoint outputs/digits
    python evaluate.py loss --checkpoint outputs/run_a --checkpoint outputs/run_b   # paired by draw
    python evaluate.py quality --samples samples/samples.npz
    python evaluate.py ref --data configs/digits.yaml --out digits_ref.npz           # reference statistics, once
    python evaluate.py fid --checkpoint outputs/digits --ref digits_ref.npz --num_samples 2000
    accelerate launch evaluate.py fid --checkpoint outputs/cifar10 --ref cifar10_ref.npz --num_samples 50000
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

from unet.checkpoint.load import load_checkpoint
from unet.config import ConfigError, TrainConfig
from unet.data.dataset import DataError, held_out_data, split_uint8
from unet.evaluation.fid import folder_images, reference_from
from unet.evaluation.held_out import bits_per_dim, held_out_losses, paired_report
from unet.evaluation.judge import check_sample_count, digit_quality, format_quality
from unet.evaluation.metrics import Reference, ReferenceError, format_measures, save_reference
from unet.evaluation.quality import digit_reference, extractor_for, feature_space, judge_reference, sample_quality
from unet.evaluation.samplers import (
    DEFAULT_RUNS,
    benchmark,
    format_seed_summary,
    format_table,
    parse_guidance,
    parse_runs,
    read_rows,
)
from unet.sample.sampling import DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS, check_seed, check_steps, generate
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
    except Exception as e:  # also a truncated file: BadZipFile, zlib.error, EOFError
        raise ValueError(f"cannot read samples {path} (expected sample.py's samples.npz): {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


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
    q = sub.add_parser("quality", help="the judge's sample quality (classifier accuracy, Frechet distance)")
    q.add_argument("--samples", required=True, help="samples.npz written by sample.py")
    q.add_argument("--data", help="the training config (YAML) whose data's judge reads them (default: the digits)")
    q.add_argument("--json", action="store_true")
    ref_args(sub.add_parser("ref", help="reference statistics (features, mean, covariance) of real images, once"))
    fid_args(sub.add_parser("fid", help="FID, KID, precision/recall of a checkpoint's samples or of saved samples"))
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


def features_args(p):
    p.add_argument("--features", choices=("auto", "judge", "inception"), default="auto",
                   help="feature space: the digit judge (1-channel digits) or Inception (torch-fidelity); auto: the "
                   "judge for digits / 1-channel images, else Inception")
    p.add_argument("--inception_weights", default=None, help="Inception weights file (default: torch-fidelity's "
                   "cache path)")
    p.add_argument("--download_inception", action="store_true", help="download Inception's weights into the "
                   "cache when missing (without it nothing is downloaded)")


def ref_args(p):
    p.add_argument("--data", required=True, help="a training config (YAML: its dataset at its image size) or a folder "
                   "of images")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--split", choices=("held_out", "train"), default="held_out",
                   help="with a config: which split (held_out: what training's eval/fid compares against)")
    features_args(p)


def fid_args(p):
    p.add_argument("--checkpoint", default=None, help="sample this checkpoint (across processes under accelerate)")
    p.add_argument("--samples", default=None, help="or measure these samples (sample.py's samples.npz)")
    p.add_argument("--ref", required=True, help="statistics from 'evaluate.py ref', a folder of images, or a "
                   "reference batch .npz (images in arr_0)")
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kid_subset_size", type=int, default=None,
                   help="KID's subset size (default: 1000, or the smaller set's size when that is less)")
    p.add_argument("--json", action="store_true")
    features_args(p)


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
    images, labels = held_out_data(TrainConfig.from_dict(loaded[0].config))
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


def resolve_space(features, image_shape, cfg=None):
    """--features auto: the training config's rule, else the judge for 1-channel images."""
    if features != "auto":
        return features
    if cfg is not None:
        return feature_space(cfg.replace(fid_features="auto"))
    return "judge" if image_shape[-1] == 1 else "inception"


def run_ref(args):
    check_output_file(args.out, "--out")
    if os.path.isdir(args.data):
        cfg, images = None, folder_images(args.data, 3)
        if args.features != "inception" and (images == images[..., :1]).all():  # grey images: one channel
            images = images[..., :1]
    else:
        cfg = TrainConfig.load(args.data)
        images, _ = split_uint8(cfg, args.split)
    space = resolve_space(args.features, images.shape[1:], cfg)
    extractor, _ = extractor_for(space, tuple(images.shape[1:]), args.inception_weights, cfg=cfg,
                                 download=args.download_inception)
    ref = Reference(extractor.name, tuple(images.shape[1:]), extractor.features(images))
    save_reference(args.out, ref)
    print(f"wrote {args.out}: {len(images)} images of {'x'.join(map(str, images.shape[1:]))}, features "
          f"{extractor.name} ({ref.features.shape[1]} dims)")


def fid_samples(args):
    """(NHWC uint8 samples, labels, the model's config or None): sampled or loaded."""
    if (args.checkpoint is None) == (args.samples is None):
        raise ValueError("give one of --checkpoint (sample it) or --samples (measure saved samples)")
    if args.samples:
        return (*_load_samples(args.samples), None)
    check_seed(args.seed)
    if args.num_samples < 2 or args.batch_size < 1:
        raise ValueError(f"--num_samples must be at least 2 and --batch_size at least 1, got {args.num_samples}, "
                         f"{args.batch_size}")
    loaded = load_checkpoint(args.checkpoint)
    check_steps(args.steps, loaded.diffusion_kwargs)
    return None, None, loaded


def run_fid(args):
    images, labels, loaded = fid_samples(args)
    cfg = TrainConfig.from_dict(loaded.config) if loaded and loaded.config else None
    shape = (loaded.image_size, loaded.image_size, loaded.model.in_channels) if loaded else tuple(images.shape[1:])
    accelerator = device_accelerator() if loaded else None
    extractor, digits = extractor_for(resolve_space(args.features, shape, cfg), shape, args.inception_weights,
                                      accelerator.device if accelerator else "cpu", cfg,
                                      download=args.download_inception)
    ref, line = reference_from(args.ref, extractor)  # before sampling: a bad reference costs nothing
    n = args.num_samples if loaded else len(images)
    subset = args.kid_subset_size or min(1000, n, len(ref.features))
    if not 2 <= subset <= min(n, len(ref.features)):
        raise ValueError(f"--kid_subset_size {subset} must be between 2 and the smaller of the sample count ({n}) "
                         f"and the reference's ({len(ref.features)})")
    if loaded:
        images, labels = generate(loaded.model.to(accelerator.device), loaded.diffusion_kwargs, loaded.image_size, n,
                                  args.scheduler, args.steps, args.batch_size, args.seed, accelerator=accelerator,
                                  null_label=loaded.null_label)
        if not accelerator.is_main_process:
            return
    q = sample_quality(ref, extractor, digits, images, labels, subset, seed=args.seed)
    q["processes"] = accelerator.num_processes if accelerator else 1
    print(json.dumps(q) if args.json else f"{line}\n{format_measures(q)}" + judge_line(q))


def judge_line(q):
    if "judge_fd" not in q:
        return ""
    acc = f", accuracy on the requested labels {q['judge_accuracy']:.4f}" if "judge_accuracy" in q else ""
    return f"\njudge: Frechet distance {q['judge_fd']:.4f} (real-vs-real floor {q['judge_fd_floor']:.4f}){acc}"


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
    rows = benchmark(loaded, runs, args.num_samples, args.batch_size, range(args.seed, args.seed + args.seeds), scales,
                     reference=judge_reference(TrainConfig.from_dict(loaded.config)) if loaded.config
                     else digit_reference(loaded.image_size))
    if args.json:
        write_json(args.json, rows, indent=1)
    print(format_table(rows) if args.seeds == 1 else format_seed_summary(rows))


def run_summary(args):
    print(format_seed_summary(read_rows(args.rows)))


def run_quality(args):
    images, labels = _load_samples(args.samples)
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"the judges need 1-channel NHWC samples, got shape {images.shape}; use fid for RGB")
    reference = judge_reference(TrainConfig.load(args.data)) if args.data else digit_reference(images.shape[1])
    q = digit_quality(images, labels, reference=reference)
    print(json.dumps(q) if args.json else format_quality(q))


COMMANDS = dict(
    bpd=run_bpd, loss=run_loss, quality=run_quality, ref=run_ref, fid=run_fid, benchmark=run_benchmark,
    summary=run_summary
)


def main(argv: "list[str] | None" = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, ReferenceError, ConfigError, DataError) as e:
        parser.exit(2, f"error: {e}\n")  # one line, exit status 2 as for argparse's own errors


if __name__ == "__main__":
    main()
