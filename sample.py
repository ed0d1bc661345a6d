"""Sample images from a trained model: see ``python sample.py --help`` and docs/sampling.md.

    python sample.py --checkpoint outputs/digits --num_samples 64 --scheduler dpm-solver++ --steps 20 --out samples
    accelerate launch --multi_gpu --num_processes 2 sample.py ...   # each process samples its share

Writes ``grid.png``, ``samples.npz`` and, with ``--png``, ``images/NNNNNN.png``. The
sampling itself is ``unet.sampling.generate``; this file is the command line and the files.
"""

import argparse
import math
import os

import numpy as np
import torch
from accelerate import Accelerator

from unet.checkpoint import ema_from_flags, load_checkpoint
from unet.images import image_grid, save_png
from unet.sampling import SCHEDULERS, check_steps, generate


def build_parser():
    p = argparse.ArgumentParser(description="Sample images from a trained model with a diffusers scheduler.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, training output dir, or improved-diffusion .pt")
    p.add_argument("--config", help="for a .pt checkpoint: YAML with improved-diffusion flags (or a '--flag value' string)")
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddpm")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the training step count)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class_labels", default=None, help="'3' or '0,1,2' (cycled); default: random")
    p.add_argument("--raw", action="store_true", help="use the trained weights, not the EMA")
    p.add_argument("--ema_rate", type=float, default=None)
    p.add_argument("--png", action="store_true", help="also write one PNG per image")
    return p


def parse_class_labels(spec, num_classes):
    """``"3"`` or ``"0,1,2"`` -> list of labels (cycled over the samples); None -> random."""
    if spec is None or spec == "":
        return None
    if num_classes is None:
        raise ValueError("--class_labels given, but this model is not class-conditional")
    labels = [int(s) for s in str(spec).split(",") if s.strip()]
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class label(s) {bad} out of range for a model with {num_classes} classes")
    return labels


def save_samples(out_dir, images, labels=None, pngs=False):
    """
    Write ``grid.png`` (near-square, 1 px black gaps, at the images' own size),
    ``samples.npz`` (``arr_0`` NHWC uint8, ``arr_1`` labels when conditional: the original's
    format, which existing evaluation suites read) and, on request, ``images/NNNNNN.png``.

    :return: the path of ``samples.npz``.
    """
    os.makedirs(out_dir, exist_ok=True)
    grid = image_grid(images, math.ceil(math.sqrt(len(images))), pad_value=0)
    save_png(grid, os.path.join(out_dir, "grid.png"), min_size=0)
    path = os.path.join(out_dir, "samples.npz")
    np.savez(path, images, *([] if labels is None else [labels]))
    if pngs:
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        for i, img in enumerate(images):
            save_png(img, os.path.join(out_dir, "images", f"{i:06d}.png"), min_size=0)
    return path


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        raise SystemExit("error: --num_samples and --batch_size must be at least 1")
    try:
        loaded = load_checkpoint(args.checkpoint, ema=ema_from_flags(args.raw, args.ema_rate), config=args.config)
        steps = args.steps or loaded.diffusion_kwargs.get("steps", 1000)
        check_steps(steps, loaded.diffusion_kwargs)
        labels = parse_class_labels(args.class_labels, loaded.model.num_classes)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    # Without cpu=True accelerate ignores a multi-process CPU launch and runs each process alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = loaded.model.to(accelerator.device)
    images, y = generate(model, loaded.diffusion_kwargs, loaded.image_size, args.num_samples, args.scheduler, steps,
                         args.batch_size, args.seed, labels, accelerator)
    if accelerator.is_main_process:
        path = save_samples(args.out, images, y, pngs=args.png)
        print(f"wrote {len(images)} samples ({accelerator.num_processes} processes) to {path} "
              f"and {os.path.join(args.out, 'grid.png')}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
