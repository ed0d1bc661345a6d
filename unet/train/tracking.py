"""
Experiment trackers through accelerate (wandb or tensorboard): offline wandb when there is no
API key, the run's config as hyperparameters, and sample grids as images. A wandb run keeps one
id across resumes and requeues: it is written to ``output_dir/wandb_run_id`` and passed back
with ``resume="allow"`` whenever the run continues one of that folder's checkpoints.
"""

import os
import secrets

RUN_ID_FILE = "wandb_run_id"


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


def wandb_run_id(output_dir, resumed_from):
    """
    The wandb run id of the run in ``output_dir``: the saved one when the run continues one of
    this folder's checkpoints and ``output_dir/wandb_run_id`` holds one, else a new id, saved
    there (written whole, then renamed) for the next resume. A fresh run, ``--overwrite true``
    included, and a run continuing another folder's checkpoint get a new id, so their steps
    never land in an older run's curves.

    :param resumed_from: the checkpoint this run continues, or None.
    """
    path = os.path.join(output_dir, RUN_ID_FILE)
    here = os.path.realpath(output_dir) + os.sep
    if resumed_from and os.path.realpath(resumed_from).startswith(here) and os.path.isfile(path):
        with open(path) as f:
            saved = f.read().strip()
        if saved:
            return saved
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], which wandb accepts as an id
    os.makedirs(output_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id


def init_trackers(accelerator, cfg, resumed_from=None):
    """Start the run's tracker with its config; returns the wandb run folder (main process,
    wandb only), else None.

    :param resumed_from: the checkpoint the run continues (None: fresh); one of ``output_dir``'s
        continues the saved wandb run id.
    """
    if cfg.report_to == "none":
        return None
    config = cfg.to_dict()
    kwargs = {}
    if cfg.report_to == "wandb":
        kwargs["wandb"] = {"dir": cfg.output_dir, "name": cfg.run_name or None, "group": cfg.group or None,
                           "tags": list(cfg.tags) or None}
        if accelerator.is_main_process:  # the only process accelerate starts a tracker on
            kwargs["wandb"].update(id=wandb_run_id(cfg.output_dir, resumed_from), resume="allow")
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
