"""
Experiment trackers through accelerate (wandb or tensorboard): wandb online when wandb finds
credentials (``wandb login`` or ``WANDB_API_KEY``), offline otherwise, the run's config as
hyperparameters, and sample grids as images. A wandb run keeps one
id across resumes and requeues: it is written to ``output_dir/wandb_run_id`` and passed back
with ``resume="allow"`` whenever the run continues one of that folder's checkpoints.
"""

import os
import secrets

RUN_ID_FILE = "wandb_run_id"


class TrackerError(RuntimeError):
    """A tracker that cannot start; the message is one line."""


def wandb_mode():
    """
    How wandb runs, as (mode, why): ``WANDB_MODE`` when the user set it; else the mode in wandb's
    own settings when that is not online (``wandb offline``); else "online" when wandb finds
    credentials the way ``wandb.init`` would (``WANDB_API_KEY``, the netrc file ``wandb login``
    writes, wandb's settings), and "offline" when it finds none, so a run never stops at a login
    prompt. Nothing is verified against a server, nothing is prompted, and wandb's settings are
    left as they were found (``wandb.init`` reads them again).
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # an older wandb, without this lookup: only the variable is seen
        if os.environ.get("WANDB_API_KEY"):
            return "online", "WANDB_API_KEY is set"
        return "offline", "WANDB_API_KEY is not set (this wandb version cannot be asked for `wandb login`'s key)"
    setup = wandb_setup.singleton()
    loaded = setup.settings_if_loaded is not None
    try:
        settings = setup.settings
        if settings.mode != "online":
            return settings.mode, "wandb's settings say so (`wandb online` undoes `wandb offline`)"
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        auth = wbauth.authenticate_session(host=host, source="unet", prompt=False, verify=False,
                                           update_session=False)
        if auth is None:
            return "offline", f"no credentials for {host.url}; `wandb login` or WANDB_API_KEY logs online"
        where = ("WANDB_API_KEY" if os.environ.get("WANDB_API_KEY") else
                 "the netrc file `wandb login` writes" if wbauth.read_netrc_auth(host=host) else "wandb's settings")
        return "online", f"wandb found credentials for {host.url} in {where}"
    except Exception as e:  # an unusable login (a malformed key, a bad host) is reported; offline still works
        return "offline", f"wandb's credentials could not be read ({type(e).__name__}: {str(e).strip()[:200]})"
    finally:
        if not loaded:
            import wandb

            wandb.teardown()  # drop the settings read here: WANDB_MODE set after this must still count


def wandb_offline_setup() -> tuple[str, str]:
    """Before an ``Accelerator(log_with="wandb")`` whose ``init_trackers`` gets no mode: wandb
    offline (``wandb sync DIR`` uploads the run later) when ``wandb_mode`` says so rather than a
    login prompt, and quietly. Returns ``wandb_mode()``."""
    mode, why = wandb_mode()
    if mode == "offline" and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return mode, why


def prepare_tracker(report_to):
    """What has to happen before the ``Accelerator`` is made with ``log_with=report_to``;
    returns accelerate's ``log_with`` (None for "none")."""
    if report_to == "wandb":
        os.environ.setdefault("WANDB_SILENT", "true")  # the mode is chosen where the run starts (init_trackers)
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
    wandb only), else None. wandb runs in ``wandb_mode()``'s mode, and one line says which and why
    (an offline run's line also says where it is and how to upload it).

    :param resumed_from: the checkpoint the run continues (None: fresh); one of ``output_dir``'s
        continues the saved wandb run id.
    """
    if cfg.report_to == "none":
        return None
    config = cfg.to_dict()
    kwargs, why = {}, ""
    if cfg.report_to == "wandb":
        kwargs["wandb"] = {"dir": cfg.output_dir, "name": cfg.run_name or None, "group": cfg.group or None,
                           "tags": list(cfg.tags) or None}
        if accelerator.is_main_process:  # the only process accelerate starts a tracker on
            mode, why = wandb_mode()
            kwargs["wandb"].update(id=wandb_run_id(cfg.output_dir, resumed_from), resume="allow", mode=mode)
            if mode != "offline":
                print(f"wandb {mode} ({why})")
    else:  # tensorboard hparams take scalars only
        config = {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in config.items()}
    accelerator.init_trackers(cfg.project, config=config, init_kwargs=kwargs)
    if cfg.report_to == "wandb" and accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        run_dir = os.path.dirname(run.dir.rstrip("/"))
        if run.settings.mode == "offline":
            print(f"wandb offline ({why}): run saved in {run_dir}; upload it later with `wandb sync {run_dir}`")
        return run_dir
    return None


def log_image(accelerator, report_to, name, image, step):
    """An HWC uint8 image to the tracker (nothing for "none")."""
    if report_to == "wandb":
        import wandb

        accelerator.get_tracker("wandb", unwrap=True).log({name: wandb.Image(image)}, step=step)
    elif report_to == "tensorboard":
        accelerator.get_tracker("tensorboard", unwrap=True).add_image(name, image, step, dataformats="HWC")
