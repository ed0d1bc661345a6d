"""
The zero-init ablation: one command trains a grid of runs that differ only where the grid
says (init scheme, norm, depth, learning rate, ...), S seeds each, and writes a report.

    python -m unet.ablation --config configs/ablation/digits.yaml --output_dir DIR

A *cell* is one combination of the grid's keys other than ``init``; its *arms* are the init
schemes. Every run is a fresh ``unet.train.loop.train(cfg)``. Training draws data order,
timesteps and noise from generators seeded by (seed, step), apart from the model's RNG, so
with the same seed every arm of every cell sees the same batches, t and noise; the held-out
loss is measured on one fixed batch with fixed t and noise, the same for every run.

Each finished run leaves ``DIR/runs/<id>/result.json``; running the command again skips
those, so an interrupted ablation continues where it stopped. Under
``accelerate launch --num_processes N -m unet.ablation ...`` each process takes every N-th
run on its own GPU (the runs are independent, not data-parallel) and process 0 writes the
report once every run is done.
"""

import csv
import gzip
import json
import math
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import yaml

from unet.config import FIELDS, ConfigError
from unet.utils.devices import cpu_cores
from unet.utils.jsonfile import clean_json, write_json
from unet.utils.stats import finite

from .answer import write_answer_report
from .definitions import never_censored
from .grid import FAILURE_KEYS, SYMMETRY_ARMS, Ablation, RunSpec, cell_label, expand, load_ablation, symmetry_config  # noqa: F401
from .report import write_report
from .store import (
    claim_process,
    finished_runs,
    fresh_run_dir,
    load_result,
    owns_run,
    progress_words,
)
from .summary import steps_to_threshold


def init_model(cfg):
    """The model exactly as ``train(cfg)`` initialises it (seeded, then built): the weights
    before the first update."""
    from accelerate.utils import set_seed

    from unet.train.factory import create_model

    set_seed(cfg.seed)
    return create_model(cfg)


def run_one(spec, threshold, smooth=10, early_steps=(10, 50, 100), failure=None, mechanism_every=50):
    """
    Train one run to ``max_steps`` and keep its full record. No failure rule acts during the
    run: only a non-finite loss or the guard stops it (``record.Recorder``); every failure
    definition (``definitions``) is scored afterwards from the record.

    :param spec: a ``RunSpec``.
    :param early_steps: the steps whose training loss is kept as ``loss_at_<step>``.
    :param failure: ``eval_every`` (the held-out check interval), ``spike_factor`` and
        ``spike_window`` (``grid.FAILURE_KEYS``).
    :param mechanism_every: unused (the mechanism is measured at every check); kept for old grids.
    :return: dict with the run's identity, ``stopped`` (None, or why the run stopped early),
        ``verdicts`` under every definition, ``checks``, ``measures``, per-step ``curves``, the
        ``mechanism`` rows and update ratios, and the ``init`` statistics.
    """
    from unet.train.loop import train

    from .definitions import final_loss, verdicts
    from .record import Recorder

    failure = {**FAILURE_KEYS, **(failure or {})}
    recorder = Recorder(init_model(spec.cfg), spec.cfg, failure["eval_every"])
    t0 = time.perf_counter()
    out = train(spec.cfg, hooks=(recorder,))
    seconds = time.perf_counter() - t0
    hist = out["history"]
    curve = lambda key: [r.get(key, float("nan")) for r in hist]  # noqa: E731
    first = hist[0] if hist else {}
    rec = dict(stopped=recorder.stopped, checks=recorder.checks, zero_predictor_loss=recorder.zero_loss,
               curves=dict(loss=curve("loss"), mse=curve("mse"), grad_norm=curve("grad_norm")))
    final = final_loss(rec)
    return dict(
        run_id=spec.run_id, cell_id=spec.cell_id, cell=spec.cell, arm=spec.arm, seed=spec.seed, **rec,
        verdicts=verdicts(rec), final_loss=None if math.isinf(final) else final,
        # the run-time facts under the old names: failed = stopped early (non-finite or guard)
        failed=recorder.stopped is not None, failure_reason=recorder.stopped, diverged=recorder.stopped is not None,
        failure_step=len(hist) if recorder.stopped else None,
        measures={**run_measures(out, curve("loss"), curve("grad_norm"), recorder.stopped, threshold, smooth,
                                 None if math.isinf(final) else final),
                  **early_measures(curve("loss"), early_steps)},
        stop_reason=recorder.stopped or out["stop_reason"], steps=len(hist), nan_skipped=out["nan_skipped"],
        seconds=seconds,
        mechanism=dict(rows=recorder.mechanism, updates={str(k): v for k, v in recorder.updates.items()},
                       fp16_overflow=recorder.overflowed(),
                       blocks=[{"step": r["step"], "activation_rms": r["activation_rms"],
                                "residual_ratios": r["residual_ratios"]} for r in hist if "activation_rms" in r]),
        init=dict(activation_rms=first.get("activation_rms", []), residual_ratios=first.get("residual_ratios", {})),
        model_key=_model_key(spec.cfg), config=spec.cfg.to_dict(),
    )


def run_measures(out, losses, grads, stopped, threshold, smooth, final):
    """The per-run measures the summary reads. A stopped run has no final or threshold measures."""
    g = finite(grads)
    return dict(
        initial_loss=losses[0] if losses and math.isfinite(losses[0]) else None,
        steps_to_threshold=None if stopped else steps_to_threshold(losses, threshold, smooth),
        final_eval_loss=None if stopped else final,
        final_eval_mse=None if stopped else final,
        max_grad_norm=max(g) if g else None,
        median_grad_norm=statistics.median(g) if g else None,
        spike_count=out["spike_count"],
        failed=stopped is not None,
        diverged=stopped is not None,
    )


def early_measures(losses, steps):
    """{"loss_at_<k>": the training loss of step k (1-based)}, None where the run had stopped
    or the loss was not finite: every arm of a seed saw the same batch, t and noise at step k."""
    return {f"loss_at_{k}": losses[k - 1] if k <= len(losses) and math.isfinite(losses[k - 1]) else None
            for k in steps}


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
    from unet.train import diagnostics
    from unet.train.loop import train

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


def wandb_group(ab: Ablation, out_dir: str) -> str:
    """The ablation's wandb group: the first invocation's when continuing, else name + time."""
    meta_path = os.path.join(out_dir, "ablation.yaml")
    saved = ""
    if not ab.group and os.path.isfile(meta_path):
        with open(meta_path) as f:
            saved = (yaml.safe_load(f) or {}).get("group", "")
    return ab.group or saved or f"{ab.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _progress_line(i, total, spec, res, threshold):
    m = res["measures"]
    reached = m["steps_to_threshold"] or "not reached"
    status = f"FAILED ({res['failure_reason']})" if res["failed"] else (
        f"held-out L_simple {m['final_eval_mse']:.4f}, steps to {threshold:g}: {reached}")
    return (f"[{i + 1}/{total}] {cell_label(spec.cell)} init={spec.arm} seed={spec.seed}: {status}, "
            f"max grad norm {m['max_grad_norm'] or float('nan'):.3g}, {res['seconds']:.1f}s")


def _run_grid(ab, runs, rank, world, log, stop_after=0.0):
    """Every run this process owns (every ``world``-th) that has no saved result yet; returns
    {run_id: result} of the runs finished so far, by any process. Several processes on one
    CPU share its cores (``cpu_threads``: cores / processes) unless the grid sets the threads.

    :param stop_after: minutes after which this process starts no new run (0: none; it always runs
        one); the grid is finished by
        running the same command again, each invocation's runs marked with its ``invocation``."""
    done, t0, started_with, ran = {}, time.perf_counter(), finished_runs(runs), False
    cores = cpu_cores()
    invocation = os.environ.get(INVOCATION_ENV) or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for i, spec in enumerate(runs):
        res = load_result(spec.cfg)
        late = stop_after and ran and time.perf_counter() - t0 > 60 * stop_after  # each process runs one at least
        if res is None and not late and owns_run(i, spec.run_id, rank, world):
            if world > 1 and not spec.cfg.cpu_threads:
                spec = replace(spec, cfg=spec.cfg.replace(cpu_threads=max(1, cores // world)))
            fresh_run_dir(spec.cfg)
            res = {**run_one(spec, ab.threshold, ab.smooth, ab.early_steps, ab.failure, ab.mechanism_every),
                   "invocation": invocation}
            ran = True
            write_json(os.path.join(spec.cfg.output_dir, "result.json"), res, clean=True)
            if not ab.save_models:
                shutil.rmtree(os.path.join(spec.cfg.output_dir, "checkpoints"), ignore_errors=True)
            log(_progress_line(i, len(runs), spec, res, ab.threshold) + "; "
                + progress_words(finished_runs(runs), len(runs), started_with, time.perf_counter() - t0), flush=True)
        if res is not None:
            done[spec.run_id] = res
    return done


def _symmetry_runs(ab, out_dir, log):
    """The symmetry runs (each arm of ``SYMMETRY_ARMS``), done now unless saved before."""
    results = []
    for arm in SYMMETRY_ARMS if ab.symmetry.get("steps", 0) > 0 else ():
        cfg = symmetry_config(ab, out_dir, arm)
        res = load_result(cfg)
        if res is None:
            fresh_run_dir(cfg)
            res = symmetry_run(cfg)
            write_json(os.path.join(cfg.output_dir, "result.json"), res, clean=True)
            log(f"symmetry run init={arm}: {ab.symmetry['steps']} steps", flush=True)
        results.append(res)
    return results


def _wait_for_other_processes(runs, done, workers=(), chunk=False):
    """Until every run has a result (``chunk``: until the workers have exited); a worker process
    that failed is a one-line error."""
    while len(done) < len(runs):
        for w in workers:
            if w.poll():
                raise ConfigError(f"a worker process exited with code {w.returncode}; "
                                  "run the same command again to finish the remaining runs")
        finished = chunk and all(w.poll() is not None for w in workers)
        if not finished:
            time.sleep(5)
        for spec in runs:
            if spec.run_id not in done:
                res = load_result(spec.cfg)
                if res is not None:
                    done[spec.run_id] = res
        if finished:
            return  # a chunk: every worker has stopped, and its last runs were read just above


def measurement_rules():
    """The rules behind measures that are not config keys, recorded with the results so the
    report states the ones the runs used."""
    from unet.train.diagnostics import SpikeDetector

    spikes = SpikeDetector()
    return {"spikes": {"factor": spikes.factor, "window": spikes.window}, "failure": dict(FAILURE_KEYS)}


def run_ablation(ab: Ablation, out_dir: str, log: Callable[[str], object] = print, command: "str | None" = None,
                 workers: "Sequence[subprocess.Popen]" = (), stop_after: float = 0.0) -> "dict | None":
    """
    Run (or finish) every run of the grid and the symmetry runs, then write ``results.json``,
    ``report.md`` and the plots into ``out_dir``; with ``stop_after`` (minutes), start no run
    after that and write only ``compact_runs.json.gz`` of the runs finished so far when the grid
    is not complete (the same command continues it).

    :param workers: the other processes' ``Popen``s (``spawn_workers``), watched for failure.
    :return: the results dict (also in ``results.json``), or None on a process other than 0 or
        for an unfinished grid.
    """
    rank, world = claim_process()
    os.makedirs(out_dir, exist_ok=True)
    ab.group = wandb_group(ab, out_dir)
    runs = expand(ab, out_dir)
    if rank == 0:
        with open(os.path.join(out_dir, "ablation.yaml"), "w") as f:
            yaml.safe_dump(clean_json(asdict(ab)), f, sort_keys=False)
    t_start = time.perf_counter()
    done = _run_grid(ab, runs, rank, world, log, stop_after)
    if rank != 0:
        return None
    _wait_for_other_processes(runs, done, workers, chunk=bool(stop_after))
    if len(done) < len(runs):
        path = write_compact({s.run_id: done[s.run_id] for s in runs if s.run_id in done},
                             os.path.join(out_dir, COMPACT_FILE))
        log(f"stopped after {stop_after:g} minutes: {len(done)} of {len(runs)} runs done ({path}); "
            "run the same command again to continue")
        return None
    symmetry = _symmetry_runs(ab, out_dir, log)
    results = clean_json(
        dict(
            name=ab.name,
            group=ab.group,
            command=command or f"unet.ablation.runner.run_ablation(..., {out_dir!r})",
            ablation=asdict(ab),
            runs=[done[s.run_id] for s in runs],
            symmetry=symmetry,
            rules=measurement_rules(),
            seconds=time.perf_counter() - t_start,
            run_seconds=sum(done[s.run_id]["seconds"] for s in runs),
        )
    )
    write_json(os.path.join(out_dir, "results.json"), results, clean=True)  # the runs are kept even if the report fails
    log_cells(ab, out_dir, results, log)
    results.update(_init_study_file(out_dir))
    if never_censored(results):
        _log_report(ab, out_dir, {"plots": write_grid_report(results, out_dir)[1:]}, results)
        log(f"report: {os.path.join(out_dir, 'report.md')}; compact per-run results: "
            f"{os.path.join(out_dir, COMPACT_FILE)}")
        return results
    files = write_report(results, out_dir)
    results["summary"] = clean_json(files.pop("summary"))
    write_json(os.path.join(out_dir, "results.json"), results, clean=True)
    write_runs_table(results, os.path.join(out_dir, "runs.csv"))
    _log_report(ab, out_dir, files, results)
    log(f"report: {os.path.join(out_dir, 'report.md')}")
    return results


def _wandb_accelerator(ab, out_dir, name, config, tags):
    """An ``Accelerator`` with one offline-capable wandb run in the ablation's group."""
    from accelerate import Accelerator

    from unet.train.tracking import wandb_offline_setup

    wandb_offline_setup()
    acc = Accelerator(log_with="wandb", project_dir=out_dir)
    acc.init_trackers(ab.base.get("project", FIELDS["project"].default), config=config,
                      init_kwargs={"wandb": {"dir": out_dir, "name": name, "group": ab.group, "tags": tags,
                                             "job_type": name.split("-")[0]}})
    return acc


def log_cells(ab, out_dir, results, log=print):
    """
    One wandb run per (cell, arm) in the ablation's group, with every seed's curves as series
    (``train/loss/s<seed>``, ``eval/mse/s<seed>``) and the cell's failure count in its summary:
    a few dozen runs instead of one per training run, whose start-up would cost more than
    the short runs themselves. Off unless the grid's ``report_to`` is wandb.
    """
    if ab.base.get("report_to", FIELDS["report_to"].default) != "wandb":
        return
    t0 = time.perf_counter()
    by_cell = {}
    for r in results["runs"]:
        by_cell.setdefault((r["cell_id"], r["arm"]), []).append(r)
    for (cell_id, arm), runs in by_cell.items():
        acc = _wandb_accelerator(ab, out_dir, f"cell-{cell_id}-{arm}", {"cell": runs[0]["cell"], "init": arm},
                                 [f"cell:{cell_id}", f"init:{arm}"])
        steps = max(len(r["curves"]["loss"]) for r in runs)
        for step in range(1, steps + 1):
            row = {f"train/loss/s{r['seed']}": r["curves"]["loss"][step - 1] for r in runs
                   if step <= len(r["curves"]["loss"])}
            for r in runs:
                checks = r.get("checks") or {"steps": r["curves"].get("eval_steps", []),
                                             "mse": r["curves"].get("eval_mse", [])}
                if step in checks["steps"]:
                    row[f"eval/mse/s{r['seed']}"] = checks["mse"][checks["steps"].index(step)]
            acc.log(row, step=step)
        summary = {"stopped": sum(bool(r["failed"]) for r in runs), "runs": len(runs)}
        for name in runs[0].get("verdicts", {}):  # every failure definition's count, scored from the records
            summary[f"failed/{name}"] = sum(bool(r["verdicts"][name]) for r in runs)
        acc.get_tracker("wandb", unwrap=True).summary.update(summary)
        acc.end_training()
    log(f"wandb: {len(by_cell)} cell runs in group {ab.group} ({time.perf_counter() - t0:.0f}s)", flush=True)


def _log_report(ab, out_dir, files, results):
    """The plots and the main numbers as one more run in the wandb group, through accelerate."""
    report_to = ab.base.get("report_to", FIELDS["report_to"].default)
    if report_to != "wandb":
        return
    import wandb

    acc = _wandb_accelerator(ab, out_dir, "report", {"ablation": ab.name}, ["report"])
    run = acc.get_tracker("wandb", unwrap=True)
    run.log({os.path.splitext(os.path.basename(p))[0]: wandb.Image(p) for p in files["plots"]})
    rows = [
        [r["cell_id"], json.dumps(r["cell"]), r["arm"], r["seed"], *[r["measures"][k] for k in sorted(r["measures"])]]
        for r in results["runs"]
    ]
    cols = ["cell_id", "cell", "init", "seed", *sorted(results["runs"][0]["measures"])] if rows else []
    if rows:
        run.log({"runs": wandb.Table(columns=cols, data=rows)})
    acc.end_training()


def report_command(out_dir, source=None):
    """The command that rebuilds a never-censored grid's report (the report names it)."""
    return " ".join(["python ablation.py --report_only", *(["--results", source] if source else []),
                     "--output_dir", out_dir])


def report_only(out_dir: str, source: "str | None" = None) -> None:
    """Rebuild ``report.md`` and the plots from ``out_dir/results.json``, or from ``source`` (a
    results.json, gzipped or not, such as ``docs/ablation/digits_results.json.gz``, or a
    never-censored grid's compact results, such as ``docs/ablation/fashion_runs.json.gz``). A
    never-censored grid's report is built from its compact results alone (written beside it
    when the source is a full results.json); an older grid's also rewrites its summary."""
    path = os.path.join(out_dir, "results.json")
    source = source or path
    if not os.path.isfile(source):
        raise ConfigError(f"'{source}' does not exist: run the ablation first")
    opener = gzip.open if source.endswith(".gz") else open
    try:
        with opener(source, "rt") as f:
            results = json.load(f)
        results["runs"]
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        raise ConfigError(f"'{source}' is not a results.json: {e}") from None
    os.makedirs(out_dir, exist_ok=True)
    if never_censored(results):
        if "ablation" not in results:
            raise ConfigError(f"'{source}' has runs but no grid ('ablation'): it is a chunk's compact file; "
                              "finish the grid to report on it")
        command = report_command(out_dir, None if source == path else source)
        if "curves" not in results["runs"][0] or "loss" in results["runs"][0]["curves"]:  # a full results.json
            results.update(_init_study_file(out_dir) or _init_study_file(os.path.dirname(source)))
            write_grid_report(results, out_dir, command)
        else:  # compact results already
            write_answer_report({**results, "report_command": command}, out_dir)
        print(f"report: {os.path.join(out_dir, 'report.md')}")
        return
    results.update(_init_study_file(out_dir) or _init_study_file(os.path.dirname(source)))
    results["summary"] = write_report(results, out_dir)["summary"]
    write_json(path, results, clean=True)
    write_runs_table(results, os.path.join(out_dir, "runs.csv"))
    print(f"report: {os.path.join(out_dir, 'report.md')}")


INVOCATION_ENV = "UNET_ABLATION_INVOCATION"  # one id for the runs of every process of one invocation
COMPACT_KEYS = ("run_id", "cell_id", "cell", "arm", "seed", "invocation", "stopped", "verdicts", "final_loss",
                "zero_predictor_loss", "checks", "steps", "seconds")


def compact_run(r):
    """What the tables and tests need of one run, and its curves (training L_simple at 4
    significant digits), without the per-step measures the report's plots read."""
    out = {k: r.get(k) for k in COMPACT_KEYS}
    out["curves"] = {"mse": [None if v is None or not math.isfinite(v) else float(f"{v:.4g}")
                             for v in r["curves"]["mse"]]}
    mech = r.get("mechanism", {})
    out["mechanism"] = {"updates": mech.get("updates"), "fp16_overflow": mech.get("fp16_overflow"),
                        "rows": mech.get("rows")}
    return out


def _write_gzip_json(path, obj):
    """``obj`` as gzip'd JSON in one step, without a timestamp in the header (same data, same bytes)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(json.dumps(clean_json(obj), sort_keys=True).encode())
    os.replace(tmp, path)
    return path


def write_compact(done, path):
    """{run_id: result} as one gzip'd JSON file of ``compact_run``s (committed as chunks finish)."""
    return _write_gzip_json(path, {"runs": [compact_run(r) for r in done.values()]})


COMPACT_FILE = "compact_runs.json.gz"


def write_compact_results(results, out_dir):
    """A finished never-censored grid's compact results (what its report reads: the grid, every
    run's ``compact_run``, the symmetry runs, the init study) into ``out_dir/COMPACT_FILE``;
    returns them."""
    data = clean_json({"name": results["name"], "command": results.get("command", ""),
                       "ablation": results["ablation"], "symmetry": results.get("symmetry"),
                       "init_study": results.get("init_study"),
                       "runs": [compact_run(r) for r in results["runs"]]})
    _write_gzip_json(os.path.join(out_dir, COMPACT_FILE), data)
    return data


def write_grid_report(results, out_dir, command=None):
    """A finished never-censored grid's compact results (``write_compact_results``) and the report
    built from them alone, which names ``command`` (default: rebuild from ``out_dir``); returns the
    report's paths."""
    data = write_compact_results(results, out_dir)
    return write_answer_report({**data, "report_command": command or report_command(out_dir)}, out_dir)


RUN_COLUMNS = ("run_id", "norm", "num_res_blocks", "lr", "arm", "seed", "failed", "diverged", "failure_step",
               "failure_reason", "final_eval_mse", "final_eval_loss", "steps", "seconds")


def write_runs_table(results, path):
    """One CSV row per run with what the endpoints read (failed, diverged, the final held-out
    L_simple), so the failure fractions and the tests can be recomputed without results.json."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RUN_COLUMNS)
        for r in results["runs"]:
            m, cfg = r["measures"], r["config"]
            w.writerow([r["run_id"], cfg["norm"], cfg["num_res_blocks"], cfg["lr"], r["arm"], r["seed"], r["failed"],
                        r["diverged"], r["failure_step"], r["failure_reason"] or "", m.get("final_eval_mse"),
                        m.get("final_eval_loss"), r["steps"], round(r["seconds"], 2)])


def _init_study_file(out_dir):
    """{"init_study": ...} from ``out_dir/init_study.json`` if the init study ran there, else {}."""
    path = os.path.join(out_dir, "init_study.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {"init_study": json.load(f)}


def run_init_study(ab: Ablation, out_dir: str, log: Callable[[str], object] = print) -> None:
    """The init-only scaling study and the init memory of the grid's first panel, into
    ``out_dir/init_study.json`` (the report picks it up)."""
    from .init_study import init_memory, scaling_study

    t0 = time.perf_counter()
    runs = expand(ab, out_dir)
    cfg = runs[0].cfg.replace(output_dir=os.path.join(out_dir, "init_memory"), seed=ab.seeds[0])
    panel = sorted({float(r.cfg.lr) for r in runs if (r.cfg.norm, r.cfg.num_res_blocks, r.cfg.warmup_steps)
                    == (cfg.norm, cfg.num_res_blocks, cfg.warmup_steps)})
    scaling = scaling_study()
    # the first panel's smallest and largest lr: the practical end and the edge
    memory = init_memory(cfg, lrs=tuple(dict.fromkeys((panel[0], panel[-1]))), steps=cfg.max_steps,
                         every=max(25, cfg.max_steps // 10))
    study = {"scaling": scaling, "memory": {"panel": cfg_label(cfg), "steps": next(iter(memory.values()))["steps"],
                                            "ratio": {f"{lr:g}": m["ratio"] for lr, m in memory.items()}},
             "seconds": time.perf_counter() - t0}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "init_study.json"), study, clean=True)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    log(f"init study: {len(scaling)} models, init memory at lr {', '.join(study['memory']['ratio'])} "
        f"({study['seconds']:.0f}s): {os.path.join(out_dir, 'init_study.json')}")


def cfg_label(cfg):
    return f"norm={cfg.norm}, num_res_blocks={cfg.num_res_blocks}, init arms zero and standard"


def combine(out_dir: str, sources: Sequence[str]) -> None:
    """
    One report over several finished ablations of the same grid run with different seeds (say
    ``--seeds 0,1,2,3,4`` and ``--seeds 5,6,7,8,9``): their runs pooled, so the seed-paired
    tests have every seed. Writes ``out_dir/results.json``, ``report.md`` and the plots.

    :param sources: the ablations' output folders, each with its ``results.json``.
    """
    loaded = []
    for src in sources:
        path = os.path.join(src, "results.json")
        if not os.path.isfile(path):
            raise ConfigError(f"'{path}' does not exist: run that ablation first")
        with open(path) as f:
            loaded.append(json.load(f))
    grid = [{k: v for k, v in r["ablation"].items() if k not in ("seeds", "group")} for r in loaded]
    if any(g != grid[0] for g in grid):
        raise ConfigError("--combine needs ablations of the same grid (only their seeds may differ)")
    seeds = [s for r in loaded for s in r["ablation"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--combine needs different seeds in each ablation, got {seeds}")
    first = loaded[0]
    results = {
        **first,
        "ablation": {**first["ablation"], "seeds": seeds},
        "runs": [x for r in loaded for x in r["runs"]],
        "command": f"python -m unet.ablation --combine {','.join(sources)} --output_dir {out_dir}",
        "seconds": sum(r["seconds"] for r in loaded),
        "run_seconds": sum(r["run_seconds"] for r in loaded),
    }
    os.makedirs(out_dir, exist_ok=True)
    if never_censored(results):
        write_json(os.path.join(out_dir, "results.json"), results, clean=True)
        write_grid_report(results, out_dir)
    else:
        results["summary"] = write_report(results, out_dir)["summary"]
        write_json(os.path.join(out_dir, "results.json"), results, clean=True)
    print(f"report: {os.path.join(out_dir, 'report.md')}")
