"""Sample images from a trained model: see ``python sample.py --help`` and docs/sampling.md.

    python sample.py --checkpoint outputs/digits --num_samples 64 --scheduler dpm-solver++ --steps 20 --out samples
    python sample.py --checkpoint outputs/digits-cfg --class_labels 7 --guidance_scale 2 --out sevens
    accelerate launch --multi_gpu --num_processes 2 sample.py ...   # each process samples its share

Writes ``grid.png``, ``samples.npz`` and, with ``--png``, ``images/NNNNNN.png``. The
sampling itself is ``unet.sample.sampling.generate``; this file is the command line and the files.
Bad input is one line on stderr and exit status 2, found before any sampling starts.
"""

import argparse
import math
import os
import re

import numpy as np

from unet.checkpoint.load import ema_from_flags, load_checkpoint
from unet.core.model import LAYOUTS, apply_layout
from unet.sample.sampling import (
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    SCHEDULERS,
    check_guidance,
    check_seed,
    check_steps,
    default_steps,
    generate,
    real_class_count,
)
from unet.utils.devices import device_accelerator
from unet.utils.images import image_grid, save_png


def build_parser():
    p = argparse.ArgumentParser(description="Sample images from a trained model with a diffusers scheduler.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, training output dir, or improved-diffusion .pt")
    p.add_argument(
        "--config", help="for a .pt checkpoint: YAML with improved-diffusion flags (or a '--flag value' string)"
    )
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER,
                   help=f"the sampler (default {DEFAULT_SCHEDULER}: docs/sampling.md's table)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (default {DEFAULT_STEPS}, or the training step count if fewer)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class_labels", default=None, help="'3' or '0,1,2' (cycled); default: random")
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="classifier-free guidance weight w >= 0 (1: none); needs a model trained with class_dropout_prob > 0",
    )
    p.add_argument("--raw", action="store_true", help="use the trained weights, not the EMA")
    p.add_argument("--ema_rate", type=float, default=None)
    p.add_argument("--png", action="store_true", help="also write one PNG per image")
    p.add_argument("--memory_format", choices=LAYOUTS, default="auto",
                   help="the network's layout; auto: channels-last for 2-D models of 64+ base channels")
    return p


def parse_class_labels(spec, num_classes):
    """``"3"`` or ``"0,1,2"`` -> list of labels (cycled over the samples); None -> random."""
    if spec is None or spec == "":
        return None
    if num_classes is None:
        raise ValueError("--class_labels given, but this model is not class-conditional")
    try:
        labels = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--class_labels takes integers such as '3' or '0,1,2', got {spec!r}") from None
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class label(s) {bad} out of range for a model with {num_classes} classes")
    return labels


PNG_NAME = re.compile(r"^\d{6}\.png$")


def prepare_out(out_dir):
    """Create ``out_dir`` (or check an existing one) before any sampling, so that a file in the
    way or a folder that cannot be written is a one-line error, not work lost at the end."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir}: the output folder is not writable")


def remove_stale_pngs(out_dir):
    """Delete ``images/NNNNNN.png`` of an earlier run in the same folder (other files stay), so
    that the folder's PNGs are always this run's samples."""
    folder = os.path.join(out_dir, "images")
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if PNG_NAME.match(name):
                os.remove(os.path.join(folder, name))


def save_samples(out_dir, images, labels=None, pngs=False):
    """
    Write ``grid.png`` (near-square, 1 px black gaps, at the images' own size),
    ``samples.npz`` (``arr_0`` NHWC uint8, ``arr_1`` labels when conditional: the original's
    format, which existing evaluation suites read) and, on request, ``images/NNNNNN.png``.

    :return: the path of ``samples.npz``.
    """
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_pngs(out_dir)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.num_samples < 1 or args.batch_size < 1:
            raise ValueError("--num_samples and --batch_size must be at least 1")
        loaded = load_checkpoint(args.checkpoint, ema=ema_from_flags(args.raw, args.ema_rate), config=args.config)
        steps = default_steps(loaded.diffusion_kwargs) if args.steps is None else args.steps
        check_steps(steps, loaded.diffusion_kwargs)
        check_seed(args.seed)
        null_label = loaded.null_label
        check_guidance(args.guidance_scale, loaded.model.num_classes, null_label)
        labels = parse_class_labels(args.class_labels, real_class_count(loaded.model, null_label))
        prepare_out(args.out)  # every process checks, so that none waits for a main process that stopped
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")  # one line, exit status 2 as for argparse's own errors
    # Without cpu=True accelerate ignores a multi-process CPU launch and runs each process alone.
    accelerator = device_accelerator()
    model = loaded.model.to(accelerator.device)
    layout = apply_layout(model, args.memory_format, train=False)
    if args.memory_format == "auto" and accelerator.is_main_process:
        print(f"memory_format auto: {layout} for sampling")
    images, y = generate(model, loaded.diffusion_kwargs, loaded.image_size, args.num_samples, args.scheduler, steps,
                         args.batch_size, args.seed, labels, accelerator, guidance_scale=args.guidance_scale,
                         null_label=null_label)
    if accelerator.is_main_process:
        path = save_samples(args.out, images, y, pngs=args.png)
        print(f"wrote {len(images)} samples ({accelerator.num_processes} processes) to {path} "
              f"and {os.path.join(args.out, 'grid.png')}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
