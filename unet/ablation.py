"""
The zero-init ablation: one command trains a grid of runs that differ only where the grid
says (init scheme, norm, depth, learning rate, ...), S seeds each, and writes a report.

    python -m unet.ablation --config configs/ablation/digits.yaml --output_dir DIR

A *cell* is one combination of the grid's keys other than ``init``; its *arms* are the init
schemes. Every run is a fresh ``unet.training.train(cfg)``. Training draws data order,
timesteps and noise from generators seeded by (seed, step), apart from the model's RNG, so
with the same seed every arm of every cell sees the same batches, t and noise; the held-out
loss is measured on one fixed batch with fixed t and noise, the same for every run.

Each finished run leaves ``DIR/runs/<id>/result.json``; running the command again skips
those, so an interrupted ablation continues where it stopped. Under
``accelerate launch --num_processes N -m unet.ablation ...`` each process takes every N-th
run on its own GPU (the runs are independent, not data-parallel) and process 0 writes the
report once every run is done.
"""

import json
import math
import os
import shutil
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict

import yaml

from .ablation_grid import SYMMETRY_ARMS, Ablation, RunSpec, cell_label, expand, load_ablation, symmetry_config  # noqa: F401
from .config import FIELDS, ConfigError
from .report import finite, steps_to_threshold, write_report

def init_model(cfg):
    """The model exactly as ``train(cfg)`` initialises it (seeded, then built): the weights
    before the first update."""
    from accelerate.utils import set_seed

    from .model import UNetModel

    set_seed(cfg.seed)
    return UNetModel(**cfg.model_kwargs())


def run_one(spec, threshold, smooth=10):
    """
    Train one run and reduce it to the ablation's measures.

    :param spec: a ``RunSpec``.
    :return: dict with the run's identity, ``measures``, per-step ``curves`` (loss,
        grad_norm, update_ratio) and the ``init`` activation statistics.
    """
    from . import diagnostics
    from .training import train

    before = diagnostics.snapshot(init_model(spec.cfg))
    ratios = []

    def update_ratio(step, record, model):
        nonlocal before
        ratios.append(float("nan") if record.get("skipped") else diagnostics.update_to_weight_ratio(before, model))
        before = diagnostics.snapshot(model)

    factor, recent, first, why = spec.cfg.divergence_factor, deque(maxlen=smooth), [], []

    def diverging(step, record, model):
        # Divergence: a non-finite loss or gradient at any step (even step 1), or the median of
        # the last `smooth` losses above `factor` x the initial loss. The median, not one loss:
        # under L_hybrid a single batch with t near 0 can exceed 10x the initial loss through
        # its VB term, in every arm alike; that is a spike (counted), not a divergence.
        loss = record.get("loss", float("nan"))
        if not (math.isfinite(loss) and math.isfinite(record.get("grad_norm", 0.0))):
            why.append("non-finite loss or gradient")
            return True
        first.append(loss)
        recent.append(loss)
        if factor and len(recent) == smooth and statistics.median(recent) > factor * first[0]:
            why.append(f"median of {smooth} losses above {factor:g}x the initial loss")
            return True
        return False

    t0 = time.perf_counter()
    out = train(spec.cfg.replace(divergence_factor=0.0), hooks=(update_ratio, diverging))
    seconds = time.perf_counter() - t0
    hist = out["history"]
    losses = [r.get("loss", float("nan")) for r in hist]
    grads = [r.get("grad_norm", float("nan")) for r in hist]
    last = hist[-1] if hist else {}
    reason = why[0] if why else {"nan": "non-finite loss"}.get(out["stop_reason"])
    if reason is None and not math.isfinite(last.get("eval_loss", 0.0)):
        reason = "non-finite held-out loss"
    diverged = reason is not None
    g, u = finite(grads), finite(ratios)
    measures = dict(
        initial_loss=losses[0] if losses and math.isfinite(losses[0]) else None,
        steps_to_threshold=None if diverged else steps_to_threshold(losses, threshold, smooth),
        final_eval_loss=None if diverged else last.get("eval_loss"),
        final_eval_mse=None if diverged else last.get("eval_mse"),
        max_grad_norm=max(g) if g else None,
        median_grad_norm=statistics.median(g) if g else None,
        median_update_ratio=statistics.median(u) if u else None,
        max_update_ratio=max(u) if u else None,
        spike_count=out["spike_count"],
        diverged=diverged,
    )
    first = hist[0] if hist else {}
    return dict(run_id=spec.run_id, cell_id=spec.cell_id, cell=spec.cell, arm=spec.arm, seed=spec.seed,
                measures=measures, stop_reason=reason or out["stop_reason"], steps=len(hist), nan_skipped=out["nan_skipped"],
                seconds=seconds, curves=dict(loss=losses, grad_norm=grads, update_ratio=ratios),
                init=dict(activation_rms=first.get("activation_rms", []), residual_ratios=first.get("residual_ratios", {})),
                model_key=_model_key(spec.cfg), config=spec.cfg.to_dict())


def _model_key(cfg):
    """What the init depends on (the model's arguments and seed-independent shape), as a label."""
    kw = {k: v for k, v in cfg.model_kwargs().items() if k != "init"}
    return json.dumps(kw, sort_keys=True, default=list)


def symmetry_run(cfg):
    """
    A short run recording, after every step, how distinct the output channels of each zeroed
    layer are (``diagnostics.zeroed_layer_distinctness``: 0 = all channels identical) and the
    fraction of parameter tensors that have moved from their initial value.
    """
    from . import diagnostics
    from .training import train

    model = init_model(cfg)
    init = diagnostics.snapshot(model)
    layers = {name: [v] for name, v in diagnostics.zeroed_layer_distinctness(model).items()}
    moved, losses = [0.0], []

    def record(step, rec, model):
        for name, v in diagnostics.zeroed_layer_distinctness(model).items():
            layers[name].append(v)
        params = list(model.named_parameters())
        moved.append(sum(not bool(p.detach().eq(init[n]).all()) for n, p in params) / len(params))
        losses.append(rec.get("loss", float("nan")))

    train(cfg, hooks=(record,))
    return dict(arm=cfg.init, steps=list(range(len(moved))), layers=layers, moved_fraction=moved, loss=losses,
                first_distinct=_first_distinct(layers), config=cfg.to_dict())


def _first_distinct(layers):
    """{layer: the first step after which its output channels differ, or None}."""
    return {n: next((s for s, v in enumerate(vals) if v > 0), None) for n, vals in layers.items()}


def _claim_process():
    """This process's (rank, world size). Under ``accelerate launch``/torchrun each process
    runs whole runs of its own, so the launcher's distributed variables are removed (each
    run's Accelerator is then a single-process one) and the process keeps to one GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[local % len(visible)] if visible else str(local)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
              "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    return rank, world


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f)
    os.replace(tmp, path)  # a run's result appears whole or not at all


def _clean(obj):
    """JSON without NaN/inf (which ``json`` would write but JSON does not allow)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _load_result(cfg):
    """The saved result of a finished run with this config, or None if there is none yet."""
    path = os.path.join(cfg.output_dir, "result.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None  # a damaged result: the run is done again
    ignore = ("group", "tags", "progress", "report_to", "project")
    same = {k: v for k, v in res.get("config", {}).items() if k not in ignore} == \
        {k: v for k, v in _clean(cfg.to_dict()).items() if k not in ignore}
    if not same:
        raise ConfigError(f"'{path}' holds a run with a different config; use a new --output_dir "
                          f"(or delete that folder) to run this grid")
    return res


def _fresh(cfg):
    if os.path.isdir(cfg.output_dir):
        shutil.rmtree(cfg.output_dir)  # an interrupted run starts over; finished ones are kept


def run_ablation(ab, out_dir, log=print, command=None):
    """
    Run (or finish) every run of the grid and the symmetry runs, then write ``results.json``,
    ``report.md`` and the plots into ``out_dir``.

    :return: the results dict (also in ``results.json``), or None on a process other than 0.
    """
    rank, world = _claim_process()
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "ablation.yaml")
    if os.path.isfile(meta_path):  # continuing: keep the first invocation's wandb group
        with open(meta_path) as f:
            ab.group = ab.group or (yaml.safe_load(f) or {}).get("group", "")
    ab.group = ab.group or f"{ab.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = expand(ab, out_dir)
    if rank == 0:
        with open(meta_path, "w") as f:
            yaml.safe_dump(_clean(asdict(ab)), f, sort_keys=False)
    t_start = time.perf_counter()
    done = {}
    for i, spec in enumerate(runs):
        res = _load_result(spec.cfg)
        if res is not None:
            done[spec.run_id] = res
            continue
        if i % world != rank:
            continue
        _fresh(spec.cfg)
        res = run_one(spec, ab.threshold, ab.smooth)
        _write_json(os.path.join(spec.cfg.output_dir, "result.json"), res)
        if not ab.save_models:
            shutil.rmtree(os.path.join(spec.cfg.output_dir, "checkpoints"), ignore_errors=True)
        done[spec.run_id] = res
        m = res["measures"]
        status = f"DIVERGED at step {res['steps']}: {res['stop_reason']}" if m["diverged"] else (
            f"held-out loss {m['final_eval_loss']:.4f}, steps to {ab.threshold:g}: {m['steps_to_threshold'] or 'not reached'}")
        log(f"[{i + 1}/{len(runs)}] {cell_label(spec.cell)} init={spec.arm} seed={spec.seed}: {status}, "
            f"max grad norm {m['max_grad_norm'] or float('nan'):.3g}, spikes {m['spike_count']}, {res['seconds']:.1f}s",
            flush=True)
    if rank != 0:
        return None
    symmetry = []
    if ab.symmetry.get("steps", 0) > 0:
        for arm in SYMMETRY_ARMS:
            cfg = symmetry_config(ab, out_dir, arm)
            res = _load_result(cfg)
            if res is None:
                _fresh(cfg)
                res = symmetry_run(cfg)
                _write_json(os.path.join(cfg.output_dir, "result.json"), res)
                log(f"symmetry run init={arm}: {ab.symmetry['steps']} steps", flush=True)
            symmetry.append(res)
    while len(done) < len(runs):  # other processes' runs
        time.sleep(5)
        for spec in runs:
            if spec.run_id not in done:
                res = _load_result(spec.cfg)
                if res is not None:
                    done[spec.run_id] = res
    results = dict(name=ab.name, group=ab.group, command=command or f"unet.ablation.run_ablation(..., {out_dir!r})",
                   ablation=asdict(ab), runs=[done[s.run_id] for s in runs], symmetry=symmetry,
                   seconds=time.perf_counter() - t_start, run_seconds=sum(done[s.run_id]["seconds"] for s in runs))
    results = _clean(results)
    files = write_report(results, out_dir)
    results["summary"] = _clean(files.pop("summary"))
    _write_json(os.path.join(out_dir, "results.json"), results)
    _log_report(ab, out_dir, files, results)
    log(f"report: {os.path.join(out_dir, 'report.md')}")
    return results


def _log_report(ab, out_dir, files, results):
    """The plots and the main numbers as one more run in the wandb group, through accelerate."""
    report_to = ab.base.get("report_to", FIELDS["report_to"].default)
    if report_to != "wandb":
        return
    from accelerate import Accelerator

    from .training import wandb_offline_setup

    wandb_offline_setup()
    import wandb

    acc = Accelerator(log_with="wandb", project_dir=out_dir)
    acc.init_trackers(ab.base.get("project", FIELDS["project"].default), config={"ablation": ab.name},
                      init_kwargs={"wandb": {"dir": out_dir, "name": "report", "group": ab.group,
                                             "tags": ["report"], "job_type": "report"}})
    run = acc.get_tracker("wandb", unwrap=True)
    run.log({os.path.splitext(os.path.basename(p))[0]: wandb.Image(p) for p in files["plots"]})
    rows = [[r["cell_id"], json.dumps(r["cell"]), r["arm"], r["seed"], *[r["measures"][k] for k in sorted(r["measures"])]]
            for r in results["runs"]]
    cols = ["cell_id", "cell", "init", "seed", *sorted(results["runs"][0]["measures"])] if rows else []
    if rows:
        run.log({"runs": wandb.Table(columns=cols, data=rows)})
    acc.end_training()


USAGE = """usage: python -m unet.ablation --config configs/ablation/NAME.yaml --output_dir DIR [--key value ...]

  --config FILE        the grid (see configs/ablation/digits.yaml)
  --output_dir DIR     runs, results.json, report.md and plots; run again to continue
  --report_only        rebuild report.md and plots from DIR/results.json
  --seeds N|a,b,c      --threshold X  --smooth N  --group NAME  --name NAME  --save_models false
  --KEY VALUE          any training config key not varied by the grid, for every run"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    try:
        opts, i = {}, 0
        while i < len(argv):
            key = argv[i]
            if not key.startswith("--"):
                raise ConfigError(f"unexpected argument {key!r}; use --key value")
            key, eq, value = key[2:].partition("=")
            key = key.replace("-", "_")
            if key == "report_only":
                opts[key], i = True, i + 1
                continue
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"option '--{key}' needs a value")
                value, i = argv[i + 1], i + 1
            opts[key], i = value, i + 1
        out_dir = opts.pop("output_dir", None)
        if not out_dir:
            raise ConfigError("--output_dir DIR is required")
        if opts.pop("report_only", False):
            path = os.path.join(out_dir, "results.json")
            if not os.path.isfile(path):
                raise ConfigError(f"'{path}' does not exist: run the ablation first")
            with open(path) as f:
                results = json.load(f)
            results["summary"] = write_report(results, out_dir)["summary"]
            _write_json(path, results)
            print(f"report: {os.path.join(out_dir, 'report.md')}")
            return 0
        config = opts.pop("config", None)
        if not config:
            raise ConfigError("--config FILE is required (e.g. configs/ablation/digits.yaml)")
        ab = load_ablation(config, opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import datasets

    datasets.disable_progress_bars()
    try:
        run_ablation(ab, out_dir, command=" ".join(["python -m unet.ablation", *argv]))
    except Exception as e:  # a run that cannot start (missing data, bad checkpoint): one line
        from .data import DataError
        from .training import TrainingError

        if isinstance(e, (ConfigError, DataError, TrainingError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
