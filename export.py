"""Export a checkpoint as a diffusers pipeline that runs without this package.

    python export.py outputs/digits exported/digits
    python export.py outputs/digits exported/digits --quality rows.json   # measured quality in the card

(``python -m unet.export ...`` is the same command.) The conversion is
``unet.sample.export.export_pipeline``; bad input is one line on stderr and exit status 2.
"""

import argparse

from unet.evaluation.samplers import read_rows, summarize_seeds
from unet.sample.export import ExportError, check_out_dir, export_pipeline
from unet.train.checkpoint import ema_from_flags, load_checkpoint


def read_quality(path):
    """The model card's quality rows from ``evaluate.py benchmark --json``: one row per run, the
    mean over seeds where the file has several; a one-line error for a file that is not such rows."""
    try:
        rows = read_rows(path)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"--quality {e}") from None
    return summarize_seeds(rows) if len({r.get("seed") for r in rows}) > 1 else rows


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Export a checkpoint as a diffusers pipeline that runs without this package."
    )
    p.add_argument("checkpoint", help="checkpoint dir, training output dir, or improved-diffusion .pt")
    p.add_argument("out", help="output folder for the pipeline (created if missing)")
    p.add_argument(
        "--config", help="for a .pt checkpoint: its improved-diffusion flags (YAML or '--flag value' string)"
    )
    p.add_argument("--raw", action="store_true", help="export the trained weights, not the EMA")
    p.add_argument("--ema_rate", type=float, default=None)
    p.add_argument("--quality", default=None, help="JSON rows of 'evaluate.py benchmark --json' for the model card")
    args = p.parse_args(argv)
    try:
        check_out_dir(args.out)
        quality = read_quality(args.quality) if args.quality else None
        loaded = load_checkpoint(args.checkpoint, ema=ema_from_flags(args.raw, args.ema_rate), config=args.config)
        diff = export_pipeline(loaded, args.out, quality=quality)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"error: {e}\n")  # one line, exit status 2 as for argparse's own errors
    kind = "DDPMPipeline" if loaded.model.num_classes is None else "ClassConditionalDDPMPipeline (pipeline.py)"
    print(f"wrote {args.out}: {kind}, UNet2DModel + DDPMScheduler, README.md; max output difference to ours {diff:.2g}")


if __name__ == "__main__":
    main()
