"""What the checkpoint manifest (sha256 of every file) costs per save: a short training run with a
checkpoint every step, each save's wall time split into writing the manifest and the rest.

    python -m benchmarks.manifest_cost [--config configs/digits.yaml] [--key value ...]

(train.py's keys; six steps with a checkpoint after each unless --max_steps says otherwise.)

Prints one JSON line: the checkpoint's size, the median save time and the median manifest time.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unet.config import load_config  # noqa: E402
from unet.train import checkpoint as ckpt_mod  # noqa: E402
from unet.train.loop import train  # noqa: E402


def main(argv: list) -> dict:
    saves, manifests = [], []
    real_save, real_manifest = ckpt_mod.save_checkpoint, ckpt_mod.write_manifest

    def timed_save(*a, **k):
        t = time.perf_counter()
        out = real_save(*a, **k)
        saves.append(time.perf_counter() - t)
        return out

    def timed_manifest(*a, **k):
        t = time.perf_counter()
        out = real_manifest(*a, **k)
        manifests.append(time.perf_counter() - t)
        return out

    ckpt_mod.write_manifest = timed_manifest
    import unet.train.loop as loop
    loop.save_checkpoint = timed_save
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(["--output_dir", out, "--max_steps", "6", "--checkpoint_every", "1", "--report_to", "none",
                           "--progress", "false", "--sample_every", "-1", "--fid_every", "0", "--eval_every", "0",
                           "--diagnostics_every", "0", "--keep_checkpoints", "2", *argv])
        s = train(cfg)
        ckpt = s["checkpoint"]
        size = sum(os.path.getsize(os.path.join(ckpt, n)) for n in os.listdir(ckpt))
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    row = dict(checkpoint_mib=round(size / 2 ** 20, 2), saves=len(saves), save_ms=round(1e3 * median(saves), 1),
               manifest_ms=round(1e3 * median(manifests), 1),
               manifest_share=round(median(manifests) / median(saves), 3))
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__.strip())
        sys.exit(0)
    main(sys.argv[1:])
