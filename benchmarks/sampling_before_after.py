"""
Images/s of ``unet.sample.sampling.generate`` against an older tree's, in one process on the
CPU: the older ``sampling.py`` is imported by path beside the current one (its relative imports
resolve to this tree's modules), the two alternate, the order swapped every repetition, and each
row carries a checksum of the images so that a change of numbers shows. One JSON row per line.

    git worktree add /tmp/old 59af48e
    python -m benchmarks.sampling_before_after --old_tree /tmp/old \
        --checkpoint outputs/digits --repeats 3 > rows.jsonl
"""

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unet.checkpoint.load import load_checkpoint  # noqa: E402
from unet.sample import sampling as current  # noqa: E402


def old_sampling(tree):
    """The ``sampling`` module of the tree at ``tree``, as a sibling of this tree's."""
    spec = importlib.util.spec_from_file_location("unet.sample.old_sampling",
                                                  os.path.join(tree, "unet", "sample", "sampling.py"))
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "unet.sample"
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old_tree", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num_samples", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--runs", default="dpm-solver++:20,ddpm:100")
    a = p.parse_args(argv)
    loaded = load_checkpoint(a.checkpoint)
    model, kw, size = loaded.model.eval(), loaded.diffusion_kwargs, loaded.image_size
    null = loaded.null_label
    codes = [("old", old_sampling(a.old_tree)), ("new", current)]
    for rep in range(a.repeats):
        for run in a.runs.split(","):
            sched, steps = run.split(":")
            for name, mod in codes if rep % 2 == 0 else codes[::-1]:
                mod.generate(model, kw, size, 16, sched, int(steps), a.batch_size, seed=1, progress=False,
                             null_label=null)  # warm-up
                start = time.perf_counter()
                images, _ = mod.generate(model, kw, size, a.num_samples, sched, int(steps), a.batch_size, seed=0,
                                         progress=False, null_label=null)
                rate = a.num_samples / (time.perf_counter() - start)
                print(json.dumps(dict(rep=rep, sampler=run, code=name, images_per_s=rate,
                                      checksum=float(np.asarray(images, dtype=np.float64).sum()))), flush=True)


if __name__ == "__main__":
    main()
