"""Pushing while training, as diffusers' ``train_unconditional.py`` does: with ``push_to_hub``, every
checkpoint is exported as a diffusers pipeline into ``output_dir/pipeline`` and uploaded to
``hub_model_id``, with the allow-list and model card of ``export.py --push_to_hub``
(``unet.sample.export``). A push never stops training: without a token or in offline mode one line
says so and nothing more is tried; a push that fails (network, refused) is one line and the next
checkpoint tries again."""

import os

from unet.checkpoint.load import load_checkpoint
from unet.sample.export import NO_TOKEN, ExportError, PushError, export_pipeline, missing_token, push_to_hub

PIPELINE_DIR = "pipeline"


def unavailable_reason() -> "str | None":
    """Why no push can happen in this process (no token, offline mode), or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "the Hugging Face hub is in offline mode (HF_HUB_OFFLINE)"
    return NO_TOKEN if missing_token() else None


class HubPush:
    """The main process's pushes of a run's checkpoints (``push(checkpoint)``)."""

    def __init__(self, cfg, log):
        self.cfg, self.log = cfg, log
        self.off = unavailable_reason()
        if self.off:
            log(f"push_to_hub: {self.off}; checkpoints stay local, training goes on")

    def push(self, checkpoint: str) -> None:
        """Export ``checkpoint``'s first EMA and upload it; a failure is one line."""
        if self.off or not checkpoint:
            return
        out = os.path.join(self.cfg.output_dir, PIPELINE_DIR)
        try:
            written = []
            export_pipeline(load_checkpoint(checkpoint), out, repo_id=self.cfg.hub_model_id, written=written)
            url = push_to_hub(out, self.cfg.hub_model_id, written, private=self.cfg.hub_private)
        except (PushError, ExportError) as e:
            self.log(f"push_to_hub: {e}; training goes on")
            return
        self.log(f"pushed {os.path.basename(checkpoint)} to {url}")


def make(cfg, is_main: bool, log) -> "HubPush | None":
    """A ``HubPush`` on the main process of a run with ``push_to_hub``, else None."""
    return HubPush(cfg, log) if cfg.push_to_hub and is_main else None
