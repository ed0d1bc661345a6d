"""Post-hoc EMA (EDM2): the EMA of any length from the snapshots a run stored with
``--phema_every N``, written as a checkpoint that sample.py, evaluate.py and export.py read.

    python phema.py --checkpoint outputs/digits --sigma_rel 0.08 --out outputs/digits-phema
    python phema.py --checkpoint outputs/digits --sweep 0.05,0.0625,0.075,0.0875,0.1 --out outputs/digits-best

(``python -m unet.phema ...`` is the same command.) ``--sweep`` reconstructs each length,
samples it and scores the samples with the digit judge's Frechet distance (the metric of
``evaluate.py benchmark``), and writes the best. Bad input is one line on stderr and exit 2.
"""

import argparse
import os

from unet.checkpoint.format import CheckpointError, latest_checkpoint
from unet.checkpoint.phema import (
    PhemaError,
    check_out,
    check_sigma_rel,
    reconstruct,
    run_folder,
    snapshot_profiles,
    write_checkpoint,
)


def parse_lengths(text):
    """``0.05,0.08`` as floats; a one-line error otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PhemaError(f"--sweep: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise PhemaError("--sweep: give at least one sigma_rel")
    return values


def score(folder, args):
    """The digit judge's Frechet distance of ``args.num_samples`` samples from the checkpoint ``folder``."""
    from unet.checkpoint.load import load_checkpoint
    from unet.evaluation.quality import digit_reference  # the judge fitted on the real digits
    from unet.evaluation.samplers import benchmark

    loaded = load_checkpoint(folder)
    rows = benchmark(loaded, [(args.scheduler, args.steps)], args.num_samples, seeds=(args.seed,),
                     reference=digit_reference(loaded.image_size))
    return rows[0]["fd"]


def sweep(run_dir, lengths, args, ckpt):
    """Reconstruct, sample and score each length; write the best to ``args.out``."""
    scores = {}
    for s in lengths:
        weights, info = reconstruct(run_dir, s, args.step)
        folder = write_checkpoint(ckpt, weights, info, os.path.join(args.out, f"sigma_{s:g}"))
        scores[s] = score(folder, args)
        print(f"sigma_rel {s:g}: Frechet distance {scores[s]:.3f} ({args.num_samples} samples, "
              f"{args.scheduler} {args.steps} steps, seed {args.seed})")
    best = min(scores, key=scores.get)
    weights, info = reconstruct(run_dir, best, args.step)
    write_checkpoint(ckpt, weights, {**info, "sweep": {f"{k:g}": v for k, v in scores.items()}}, args.out)
    print(f"best sigma_rel {best:g} (Frechet distance {scores[best]:.3f}): wrote {args.out}")


def main(argv: "list[str] | None" = None) -> None:
    p = argparse.ArgumentParser(description="Reconstruct a post-hoc EMA of any length from a run's snapshots.")
    p.add_argument("--checkpoint", required=True, help="a run's output_dir (or one of its checkpoint folders)")
    p.add_argument("--sigma_rel", type=float, help="the EMA length to reconstruct (relative width of its profile)")
    p.add_argument("--sweep", help="comma-separated sigma_rels: score each by the digit judge and keep the best")
    p.add_argument("--out", required=True, help="the checkpoint folder to write")
    p.add_argument("--step", type=int, default=None, help="reconstruct at this snapshot step (default: the last)")
    p.add_argument("--num_samples", type=int, default=500, help="--sweep: samples per length")
    p.add_argument("--scheduler", default="ddpm", help="--sweep: the sampler")
    p.add_argument("--steps", type=int, default=100, help="--sweep: sampling steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if (args.sigma_rel is None) == (args.sweep is None):
            raise PhemaError("give one of --sigma_rel S or --sweep S1,S2,...")
        run_dir, ckpt_step = run_folder(args.checkpoint)
        args.step = args.step if args.step is not None else ckpt_step
        lengths = parse_lengths(args.sweep) if args.sweep else [args.sigma_rel]
        stored = {s for _, s, _, _ in snapshot_profiles(run_dir, args.step)}
        for s in lengths:
            check_sigma_rel(s, stored)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"no checkpoint in '{run_dir}' to take the model's config from")
        check_out(args.out, ckpt)  # before any work: never into what training wrote
        if args.sweep:
            return sweep(run_dir, lengths, args, ckpt)
        weights, info = reconstruct(run_dir, args.sigma_rel, args.step)
        write_checkpoint(ckpt, weights, info, args.out)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {args.out}: the EMA with sigma_rel {info['sigma_rel']:g} (gamma {info['gamma']:.3f}) at step "
          f"{info['step']} from {info['snapshots']} snapshots; profile fit error {info['profile_error']:.2g}")


if __name__ == "__main__":
    main()
