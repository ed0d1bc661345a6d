"""The suite runs as .ci/run runs it, on any machine: no hub, no dataset hub, no wandb server.
Set before any test module imports huggingface_hub, datasets or wandb (they read these at import),
so a test that stands for an online machine says so itself (``constants.HF_HUB_OFFLINE = False``)."""

import os

os.environ.update(WANDB_MODE="offline", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
