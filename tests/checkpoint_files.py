"""Checkpoint folders in the training loop's layout, written by hand for the tool tests."""

from pathlib import Path

from safetensors.torch import save_file

from unet.checkpoint.format import architecture_record, write_manifest
from unet.sample.sampling import null_class_label


def write_checkpoint(root, cfg, model, ema_scale=1.0):
    """``root/checkpoints/checkpoint_00000010`` holding ``model``'s weights as the raw ones and
    ``ema_scale`` times them as the first EMA rate's (0: EMA weights that differ from the raw)."""
    path = Path(root) / "checkpoints" / "checkpoint_00000010"
    path.mkdir(parents=True)
    cfg.save(path / "config.yaml")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path / "model.safetensors")
    save_file({k: v * ema_scale for k, v in state.items()}, path / f"ema_{cfg.ema_rates[0]:g}.safetensors")
    write_manifest(str(path), architecture_record(cfg.image_size, cfg.model_kwargs(), cfg.diffusion_kwargs(),
                                                  cfg.ema_rates, null_class_label(cfg)))
    return path
