"""
Experiment trackers through accelerate (wandb or tensorboard): offline wandb when there is no
API key, the run's config as hyperparameters, and sample grids as images.
"""

import os


class TrackerError(RuntimeError):
    """A tracker that cannot start; the message is one line."""


def wandb_offline_setup():
    """No API key and no explicit mode: run wandb offline (``wandb sync DIR`` uploads the run
    later) rather than prompting for a login, and quietly."""
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")


def prepare_tracker(report_to):
    """What has to happen before the ``Accelerator`` is made with ``log_with=report_to``;
    returns accelerate's ``log_with`` (None for "none")."""
    if report_to == "wandb":
        wandb_offline_setup()
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise TrackerError("report_to=tensorboard needs the tensorboard package: pip install tensorboard") from None
    return None if report_to == "none" else report_to


def init_trackers(accelerator, cfg):
    """Start the run's tracker with its config; returns the wandb run folder (main process,
    wandb only), else None."""
    if cfg.report_to == "none":
        return None
    config = cfg.to_dict()
    kwargs = {}
    if cfg.report_to == "wandb":
        kwargs["wandb"] = {"dir": cfg.output_dir, "name": cfg.run_name or None, "group": cfg.group or None,
                           "tags": list(cfg.tags) or None}
    else:  # tensorboard hparams take scalars only
        config = {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in config.items()}
    accelerator.init_trackers(cfg.project, config=config, init_kwargs=kwargs)
    if cfg.report_to == "wandb" and accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        run_dir = os.path.dirname(run.dir.rstrip("/"))
        if run.settings.mode == "offline" or os.environ.get("WANDB_MODE") == "offline":
            print(f"wandb offline: run saved in {run_dir}; upload it later with `wandb sync {run_dir}`")
        return run_dir
    return None


def log_image(accelerator, report_to, name, image, step):
    """An HWC uint8 image to the tracker (nothing for "none")."""
    if report_to == "wandb":
        import wandb

        accelerator.get_tracker("wandb", unwrap=True).log({name: wandb.Image(image)}, step=step)
    elif report_to == "tensorboard":
        accelerator.get_tracker("tensorboard", unwrap=True).add_image(name, image, step, dataformats="HWC")
