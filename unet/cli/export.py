"""Export a checkpoint as a diffusers pipeline that runs without this package.

    python export.py outputs/digits exported/digits
    python export.py outputs/digits exported/digits --quality rows.json   # measured quality in the card
    python export.py outputs/digits exported/digits --push_to_hub --hub_model_id USER/NAME [--private]

(``python -m unet.export ...`` is the same command.) The conversion is
``unet.sample.export.export_pipeline``; bad input is one line on stderr and exit status 2.
A push that fails (no token, no network) is one line and exit status 1, after the local
folder is written.
"""

import argparse

from unet.checkpoint.load import ema_from_flags, load_checkpoint
from unet.evaluation.samplers import read_rows, summarize_seeds
from unet.sample.export import ExportError, PushError, check_out_dir, export_pipeline, push_to_hub


def read_quality(path):
    """The model card's quality rows from ``evaluate.py benchmark --json``: one row per run, the
    mean over seeds where the file has several; a one-line error for a file that is not such rows."""
    try:
        rows = read_rows(path)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"--quality {e}") from None
    return summarize_seeds(rows) if len({r.get("seed") for r in rows}) > 1 else rows


def main(argv: "list[str] | None" = None) -> None:
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
    p.add_argument("--push_to_hub", action="store_true", help="upload the folder to the Hugging Face hub")
    p.add_argument("--hub_model_id", default=None, help="with --push_to_hub: the repository, USER/NAME")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: create the repository private")
    args = p.parse_args(argv)
    try:
        check_hub_args(args)
        check_out_dir(args.out)
        quality = read_quality(args.quality) if args.quality else None
        loaded = load_checkpoint(args.checkpoint, ema=ema_from_flags(args.raw, args.ema_rate), config=args.config)
        written = []
        diff = export_pipeline(loaded, args.out, quality=quality, repo_id=args.hub_model_id, written=written)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"error: {e}\n")  # one line, exit status 2 as for argparse's own errors
    kind = "DDPMPipeline" if loaded.model.num_classes is None else "ClassConditionalDDPMPipeline (pipeline.py)"
    print(f"wrote {args.out}: {kind}, UNet2DModel + DDPMScheduler, README.md; max output difference to ours {diff:.2g}")
    if args.push_to_hub:
        try:
            print(f"pushed {args.out} to {push_to_hub(args.out, args.hub_model_id, written, private=args.private)}")
        except PushError as e:
            p.exit(1, f"error: {e}\n")


def check_hub_args(args):
    """--push_to_hub needs a valid --hub_model_id, and the hub flags need --push_to_hub."""
    from huggingface_hub.utils import validate_repo_id

    if args.push_to_hub and not args.hub_model_id:
        raise ExportError("--push_to_hub needs --hub_model_id USER/NAME")
    if (args.hub_model_id or args.private) and not args.push_to_hub:
        raise ExportError("--hub_model_id and --private go with --push_to_hub")
    if args.hub_model_id:
        try:
            validate_repo_id(args.hub_model_id)
        except ValueError as e:
            raise ExportError(f"--hub_model_id {args.hub_model_id!r}: {str(e).strip().splitlines()[0]}") from None


if __name__ == "__main__":
    main()
