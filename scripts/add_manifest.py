"""Give a checkpoint written before checkpoints had manifests (this package before 0.3) its
``manifest.json``, so that sampling, evaluation, export and resume load it again.

    python scripts/add_manifest.py outputs/digits/checkpoints/checkpoint_00003000

The manifest records the files as they are now: run it only on a checkpoint you trust (one this
package wrote and nothing has touched since). Refuses a folder that already has one."""

import os
import sys

from unet.checkpoint.format import MANIFEST_FILE, architecture_record, write_manifest
from unet.config import ConfigError, TrainConfig
from unet.sample.sampling import null_class_label


def main(argv):
    if len(argv) != 1:
        print("usage: python scripts/add_manifest.py CHECKPOINT_FOLDER", file=sys.stderr)
        return 2
    folder = argv[0]
    if os.path.exists(os.path.join(folder, MANIFEST_FILE)):
        print(f"error: '{folder}' already has a {MANIFEST_FILE}", file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig.load(os.path.join(folder, "config.yaml"))
    except ConfigError as e:
        print(f"error: '{folder}' is not a checkpoint of this package: {e}", file=sys.stderr)
        return 2
    manifest = write_manifest(folder, architecture_record(cfg.image_size, cfg.model_kwargs(), cfg.diffusion_kwargs(),
                                                          cfg.ema_rates, null_class_label(cfg)))
    print(f"wrote {os.path.join(folder, MANIFEST_FILE)}: {len(manifest['files'])} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
