"""
The ablation's grid: a YAML file of shared training keys (``base``) and sub-grids of values,
read into an ``Ablation`` and expanded into one ``TrainConfig`` per cell, init arm and seed.
Every config is built and checked here, before the first run starts, so a typo fails in a
second with a one-line message naming the key or cell; the command line's options are
overrides of the grid file's keys, parsed here too.
"""

import itertools
import math
import os
import typing
from dataclasses import dataclass, field

from unet.config import (
    FIELDS,
    TYPES,
    ConfigError,
    TrainConfig,
    parse_bool,
    parse_mapping,
    read_yaml,
    unknown_key,
)
from unet.core.choices import INIT_SCHEMES

KEYS = ("name", "group", "seeds", "threshold", "smooth", "comparisons", "symmetry", "save_models", "processes",
        "early_steps", "base_config", "base", "grid", "failure", "primary", "secondary", "equivalence_margin",
        "mechanism_every")
# The one failure rule's parameters (``unet.train.diagnostics.FailureRule``), and the defaults.
FAILURE_KEYS = {"eval_every": 25, "spike_factor": 3.0, "spike_window": 20}
# failure: a stratified exact McNemar test of one failure definition; held_out_loss: the old
# seed-paired t-test; final_loss: the never-censored grid's continuous endpoint (the mean held-out
# L_simple of the last checks, stopped runs worst), a paired Wilcoxon signed-rank test.
MEASURES_TESTED = ("failure", "held_out_loss", "final_loss")
MAX_SECONDARY = 5
# What the runner decides for every run: the grid is the only thing that differs between runs.
SYMMETRY_ARMS = ("zero", "all-zero", "standard")  # standard: random rows from the start, for scale
RUNNER_KEYS = ("output_dir", "seed", "data_seed", "group", "tags", "run_name", "resume", "progress",
               "eval_every", "diagnostics_every", "checkpoint_every", "keep_checkpoints")


@dataclass
class Ablation:
    """
    An ablation grid, read from YAML (see ``configs/ablation/digits.yaml``).

    :param name: names the wandb group (with a timestamp) and the report.
    :param base: ``TrainConfig`` keys shared by every run.
    :param grid: sub-grids, each {key: [values]} with an ``init`` list; every combination
        of a sub-grid's values is a cell x arm, run once per seed.
    :param seeds: the seeds; the same for every arm.
    :param threshold: a training loss; "steps to threshold" is the first step at which the
        running mean of the last ``smooth`` losses is at or below it.
    :param smooth: the window of that running mean, of the report's curves, and (unless
        ``base`` sets ``divergence_window``) of the divergence rule's median.
    :param comparisons: (A, B) pairs of arms compared by seed-paired differences A - B.
    :param symmetry: {steps: N, and TrainConfig keys}: N-step runs of ``zero``, ``all-zero``
        and ``standard`` that record how distinct the zeroed layers' output channels become.
    :param save_models: keep each run's final checkpoint (about 12 MB a run for the digits grid).
    :param processes: worker processes that split the runs when not started by a launcher (on
        a small CPU model, two single-thread processes beat one two-thread process).
    :param early_steps: the steps whose training loss the early-training deficit compares.
    :param failure: the failure rule's parameters (``FAILURE_KEYS``).
    :param primary: the pre-registered primary test: {name, arms: [A, B], cells: [cell, ...]};
        each cell names grid values (lr may be a list), and every seed-paired (cell, seed)
        outcome "failed" of A and B enters one stratified exact McNemar test.
    :param secondary: at most four tests of the same form, each with ``measure`` "failure" or
        "held_out_loss" (seed-paired t-test of the final held-out L_simple), Holm-corrected
        among themselves.
    :param equivalence_margin: the largest difference in failure fraction that the report calls
        no difference, when the 95% interval of the paired difference lies inside it.
    :param mechanism_every: steps between the mechanism measures (block RMS, update ratios per
        layer group, attention logits); 0 = off.
    """

    name: str
    base: dict
    grid: list
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    threshold: float = 0.3
    smooth: int = 10
    comparisons: list = field(default_factory=lambda: [["zero", "standard"]])
    symmetry: dict = field(default_factory=lambda: {"steps": 10})
    group: str = ""
    save_models: bool = True
    processes: int = 1
    early_steps: list = field(default_factory=lambda: [10, 50, 100])
    failure: dict = field(default_factory=lambda: dict(FAILURE_KEYS))
    primary: dict = field(default_factory=dict)
    secondary: list = field(default_factory=list)
    equivalence_margin: float = 0.25
    mechanism_every: int = 50


@dataclass
class RunSpec:
    """One run of the grid: its cell (the grid's non-init keys), arm, seed and full config."""

    run_id: str
    cell_id: str
    cell: dict
    arm: str
    seed: int
    cfg: TrainConfig


def _fail(path, msg):
    raise ConfigError(f"ablation config '{path}': {msg}")


def _seeds(value, path):
    if isinstance(value, int) and not isinstance(value, bool):
        seeds = list(range(value))
    elif isinstance(value, str):
        try:
            seeds = (
                list(range(int(value))) if value.strip().isdigit() else [int(s) for s in value.split(",") if s.strip()]
            )
        except ValueError:
            _fail(path, f"'seeds' must be a count or a comma-separated list of integers, got {value!r}")
    elif isinstance(value, list) and all(isinstance(s, int) for s in value):
        seeds = list(value)
    else:
        _fail(path, f"'seeds' must be a count or a list of integers, got {value!r}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        _fail(path, f"'seeds' must give at least one distinct seed >= 0, got {value!r}")
    return seeds


def _grid(value, path):
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail(path, "'grid' must be a list of sub-grids, each a mapping of key: [values]")
    grid = []
    for i, sub in enumerate(value):
        if not isinstance(sub, dict) or "init" not in sub:
            _fail(path, f"grid entry {i} must be a mapping of key: [values] with an 'init' list")
        parsed = {"seeds": _seeds(sub["seeds"], path)} if "seeds" in sub else {}
        for k, vals in sub.items():
            if k == "seeds":
                continue
            if k in RUNNER_KEYS:
                _fail(path, f"grid key '{k}' is set by the ablation runner for every run")
            if k not in FIELDS:
                raise unknown_key(k)
            # A list-valued key (channel_mult, ...) takes a list of lists; a bare list is one value.
            many = isinstance(vals, list) and (not _is_list_key(k) or (vals and isinstance(vals[0], list)))
            parsed[k] = [parse_mapping({k: v})[k] for v in (vals if many else [vals])]
            if not parsed[k]:
                _fail(path, f"grid key '{k}' lists no values")
        grid.append(parsed)
    return grid


def _is_list_key(key):
    return typing.get_origin(TYPES[key]) in (list, list)


def load_ablation(path: str, overrides: "dict[str, object] | None" = None) -> Ablation:
    """
    Read an ablation YAML and apply command-line overrides.

    :param path: the YAML file.
    :param overrides: {key: value}; ablation keys (seeds, threshold, smooth, group, name) or
        ``TrainConfig`` keys, which change ``base`` for every run (not a key the grid varies).
    :return: an ``Ablation``. Raises ``ConfigError`` with a one-line message.
    """
    raw = read_yaml(path)
    for k in raw:
        if k not in KEYS:
            _fail(path, f"unknown key '{k}'; allowed: {', '.join(KEYS)}")
    if "grid" not in raw:
        _fail(path, "missing 'grid'")
    base = _base(raw, path)
    try:
        grid = _grid(raw["grid"], path)
    except ConfigError as e:
        if str(e).startswith("ablation config"):
            raise
        _fail(path, f"in 'grid': {e}")
    ab = Ablation(name=str(raw.get("name") or os.path.splitext(os.path.basename(path))[0]), base=base, grid=grid)
    overrides = dict(overrides or {})
    for k in ("seeds", "threshold", "smooth", "comparisons", "symmetry", "group", "save_models", "processes",
              "early_steps", "failure", "primary", "secondary", "equivalence_margin", "mechanism_every"):
        if k in raw and k not in overrides:
            overrides[k] = raw[k]
    for k, v in overrides.items():
        _set(ab, k, v, path)
    _check(ab, path)
    return ab


def _base(raw, path):
    """The training keys shared by every run: ``base_config``'s file, then ``base``."""
    base = {}
    if raw.get("base_config"):
        base_path = os.path.join(os.path.dirname(path), raw["base_config"])
        base_path = base_path if os.path.isfile(base_path) else raw["base_config"]
        try:
            base.update(parse_mapping(read_yaml(base_path)))
        except ConfigError as e:
            _fail(path, f"in base_config '{base_path}': {e}")
    if not isinstance(raw.get("base", {}) or {}, dict):
        _fail(path, "'base' must be a mapping of training config keys")
    try:
        base.update(parse_mapping(raw.get("base") or {}))
    except ConfigError as e:
        _fail(path, f"in 'base': {e}")
    return base


def _set(ab, k, v, path):
    """Set one ablation key, or one training key of ``base``, from the YAML or the command line."""
    if k == "seeds":
        ab.seeds = _seeds(v, path)
    elif k in ("threshold", "smooth"):
        try:
            setattr(ab, k, float(v) if k == "threshold" else int(v))
        except (TypeError, ValueError):
            _fail(path, f"'{k}' must be a number, got {v!r}")
    elif k == "comparisons":
        if not (isinstance(v, list) and all(isinstance(c, list) and len(c) == 2 and set(c) <= set(INIT_SCHEMES)
                                            for c in v)):
            _fail(path, f"'comparisons' must be a list of [A, B] pairs of {'|'.join(INIT_SCHEMES)}, got {v!r}")
        ab.comparisons = [[str(a), str(b)] for a, b in v]
    elif k == "symmetry":
        ab.symmetry = _symmetry(v, path)
    elif k == "save_models":
        ab.save_models = parse_bool("save_models", v)
    elif k == "processes":
        ab.processes = _positive_ints("processes", v, path)[0]
    elif k == "early_steps":
        ab.early_steps = _positive_ints("early_steps", v, path, many=True)
    elif k in ("group", "name"):
        setattr(ab, k, str(v))
    elif k in ("failure", "primary", "secondary", "equivalence_margin", "mechanism_every"):
        _set_design(ab, k, v, path)
    elif k in FIELDS:
        if any(k in sub for sub in ab.grid):
            _fail(path, f"'{k}' is a key the grid varies; edit the grid instead of overriding it")
        ab.base.update(parse_mapping({k: v}))
    else:
        raise ConfigError(f"unknown option '--{k}': use an ablation key ({', '.join(KEYS[:5])}) "
                          f"or a training config key")


def _set_design(ab, k, v, path):
    """The pre-registered design: the failure rule, the primary and secondary tests."""
    if k == "failure":
        if not isinstance(v, dict) or set(v) - set(FAILURE_KEYS):
            _fail(path, f"'failure' must be a mapping of {', '.join(FAILURE_KEYS)}, got {v!r}")
        ab.failure = {**FAILURE_KEYS, **{key: type(FAILURE_KEYS[key])(x) for key, x in v.items()}}
    elif k == "primary":
        ab.primary = _test_spec(v, "primary", path)
        if ab.primary["measure"] == "held_out_loss":
            _fail(path, "'primary.measure' must be failure or final_loss")
    elif k == "secondary":
        if not isinstance(v, list) or len(v) > MAX_SECONDARY:
            _fail(path, f"'secondary' must be a list of at most {MAX_SECONDARY} tests, got {v!r}")
        ab.secondary = [_test_spec(t, f"secondary[{i}]", path) for i, t in enumerate(v)]
    elif k == "equivalence_margin":
        try:
            ab.equivalence_margin = float(v)
        except (TypeError, ValueError):
            ab.equivalence_margin = math.nan
        if not 0 < ab.equivalence_margin < math.inf:
            _fail(path, f"'equivalence_margin' must be a number > 0 in the endpoint's units, got {v!r}")
    else:
        ab.mechanism_every = int(v)


TEST_KEYS = {"name", "measure", "arms", "pairs", "cells", "definition"}


def _test_spec(v, where, path):
    """{name, measure, arms: [A, B] (or pairs: [[A, B], [C, D]], a factorial contrast: the mean of
    the pairs' differences per cell and seed), cells: [{key: value or [values]}], definition (a
    failure measure's ``definitions`` name)} of one pre-registered test."""
    from .definitions import DEFINITIONS

    if not isinstance(v, dict) or "cells" not in v or ("arms" in v) == ("pairs" in v) or set(v) - TEST_KEYS:
        _fail(path, f"'{where}' must be a mapping with name, measure, arms: [A, B] (or pairs: [[A, B], ...]) and "
                    f"cells: [...], got {v!r}")
    pairs = v["pairs"] if "pairs" in v else [v["arms"]]
    spec = {"name": str(v.get("name", where)), "measure": str(v.get("measure", "failure")),
            "arms": pairs[0] if isinstance(pairs, list) and pairs else pairs, "pairs": pairs, "cells": v["cells"]}
    if "definition" in v:
        spec["definition"] = str(v["definition"])
        if spec["definition"] not in DEFINITIONS:
            _fail(path, f"'{where}.definition' must be one of {', '.join(DEFINITIONS)}, got {v['definition']!r}")
    if spec["measure"] not in MEASURES_TESTED:
        _fail(path, f"'{where}.measure' must be {' or '.join(MEASURES_TESTED)}, got {spec['measure']!r}")
    if not (isinstance(pairs, list) and pairs and all(isinstance(a, list) and len(a) == 2 and a[0] != a[1]
                                                      for a in pairs)):
        _fail(path, f"'{where}.arms' must be two different init arms [A, B], got {v.get('arms', pairs)!r}")
    if not (isinstance(spec["cells"], list) and spec["cells"] and all(isinstance(c, dict) for c in spec["cells"])):
        _fail(path, f"'{where}.cells' must be a non-empty list of grid cells, got {spec['cells']!r}")
    return spec


def tested_cells(spec):
    """The grid cells a test spec names, each as a dict of single values (an lr list expanded)."""
    out = []
    for cell in spec["cells"]:
        keys = list(cell)
        lists = [cell[k] if isinstance(cell[k], list) else [cell[k]] for k in keys]
        out += [dict(zip(keys, values)) for values in itertools.product(*lists)]
    return out


def _check_tests(ab, path, runs):
    """Every arm and cell a pre-registered test names has runs of both arms, with the same seeds."""
    for where, spec in [("primary", ab.primary)] * bool(ab.primary) + [
        (f"secondary[{i}]", s) for i, s in enumerate(ab.secondary)
    ]:
        for cell in tested_cells(spec):
            seeds = []
            for arm in [a for pair in spec.get("pairs", [spec["arms"]]) for a in pair]:
                found = [r.seed for r in runs if r.arm == arm and cell_matches(r.cell, cell)]
                if not found:
                    _fail(path, f"'{where}' names init {arm!r} at {cell_label(cell)}, which the grid does not run")
                seeds.append(sorted(found))
            if any(s != seeds[0] for s in seeds):
                _fail(path, f"'{where}': at {cell_label(cell)} the arms run different seeds")


def cell_matches(cell, wanted):
    """Whether a run's cell has every value ``wanted`` names (floats compared as floats)."""
    return all(k in cell and (float(cell[k]) == float(v) if k == "lr" else cell[k] == v) for k, v in wanted.items())


def _positive_ints(key, v, path, many=False):
    """One integer >= 1 (or, with ``many``, a non-empty list or comma-separated string of them)."""
    items = v.split(",") if isinstance(v, str) else v if isinstance(v, list) and many else [v]
    try:
        out = [int(x) for x in items if not isinstance(x, (bool, float))]
    except (TypeError, ValueError):
        out = []
    if not items or len(out) != len(items) or min(out) < 1:
        _fail(path, f"'{key}' must be {'a list of integers' if many else 'an integer'} >= 1, got {v!r}")
    return out


def _check(ab, path):
    """Every run's config is built and checked now, not after an hour of runs."""
    if ab.smooth < 1:
        _fail(path, f"'smooth' must be >= 1, got {ab.smooth}")
    if len(ab.seeds) < 2 or any(len(sub.get("seeds", ab.seeds)) < 2 for sub in ab.grid):
        _fail(path, f"'seeds' must give at least 2 seeds: the intervals are over seeds, got {ab.seeds}")
    runs = expand(ab, "unused")
    _check_tests(ab, path, runs)
    every = ab.failure["eval_every"]
    if every < 1 or any(r.cfg.max_steps % every for r in runs):
        _fail(path, f"'failure.eval_every' ({every}) must be >= 1 and divide every run's max_steps: the last "
                    "held-out check is the endpoint")
    if ab.symmetry.get("steps", 0):
        try:
            symmetry_config(ab, "unused", "zero")
        except ConfigError as e:
            _fail(path, f"in 'symmetry': {e}")


def _symmetry(v, path):
    if v in (None, False, 0):
        return {"steps": 0}
    if not isinstance(v, dict):
        _fail(path, f"'symmetry' must be a mapping (steps: N and training keys), got {v!r}")
    steps = v.get("steps", 10)
    if not isinstance(steps, int) or steps < 0:
        _fail(path, f"'symmetry.steps' must be an integer >= 0, got {steps!r}")
    try:
        keys = parse_mapping({k: x for k, x in v.items() if k != "steps"})
    except ConfigError as e:
        _fail(path, f"in 'symmetry': {e}")
    return {"steps": steps, **keys}


def _fmt(v):
    return ",".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


def cell_label(cell):
    """'norm=group, num_res_blocks=2, lr=0.001'."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in cell.items()) or "base"


def run_config(ab, out_dir, overrides, seed, run_id, tags):
    """The ``TrainConfig`` of one run: base, then the grid's values, then what the runner fixes."""
    steps = overrides.get("max_steps", ab.base.get("max_steps", FIELDS["max_steps"].default))
    fixed = dict(output_dir=os.path.join(out_dir, "runs", run_id), seed=seed, data_seed=-1, resume="",
                 progress=False, group=ab.group, tags=tags, run_name=run_id,
                 # the held-out checks are the runner's (record.Recorder, every failure.eval_every steps);
                 # training's own block measures every mechanism_every steps (at init too)
                 eval_every=0, diagnostics_every=ab.mechanism_every or steps,
                 checkpoint_every=steps, keep_checkpoints=1,
                 # the runs log nothing themselves: the runner logs one wandb run per cell afterwards
                 report_to="none")
    # Only the runner's guard stops a run (``record.Recorder``), not training's divergence rule.
    defaults = dict(divergence_factor=0.0, sample_every=-1)
    return TrainConfig.from_dict({**defaults, **ab.base, **overrides, **fixed})


def expand(ab, out_dir):
    """Every run of the grid, cell by cell and seed by seed (so an interrupted ablation has
    whole seeds), as ``RunSpec``s. Raises ``ConfigError`` naming the bad cell."""
    runs, cells = [], {}
    for sub in ab.grid:
        keys = [k for k in sub if k not in ("init", "seeds")]
        for values in itertools.product(*(sub[k] for k in keys)):
            cell = dict(zip(keys, values))
            cell_id = cells.setdefault(cell_label(cell), f"c{len(cells):02d}")
            for seed in sub.get("seeds", ab.seeds):
                for arm in sub["init"]:
                    run_id = f"{cell_id}_{arm}_s{seed}"
                    tags = [f"cell:{cell_id}", f"init:{arm}", f"seed:{seed}"] + [
                        f"{k}:{_fmt(v)}" for k, v in cell.items()
                    ]
                    try:
                        cfg = run_config(ab, out_dir, {**cell, "init": arm}, seed, run_id, [t[:64] for t in tags])
                    except ConfigError as e:
                        raise ConfigError(f"grid cell {cell_label(cell)}, init={arm}: {e}") from None
                    runs.append(RunSpec(run_id, cell_id, cell, arm, seed, cfg))
    if len({r.run_id for r in runs}) != len(runs):
        raise ConfigError("the grid lists the same cell, init and seed twice")
    return runs


def symmetry_config(ab, out_dir, arm):
    """The config of the symmetry run of ``arm``: the symmetry cell, the first seed, no stopping."""
    opts = {k: v for k, v in ab.symmetry.items() if k != "steps"}
    cfg = run_config(ab, out_dir, {"init": arm, **opts, "max_steps": ab.symmetry["steps"], "divergence_factor": 0.0},
                     ab.seeds[0], f"symmetry_{arm}", ["symmetry", f"init:{arm}"])
    return cfg.replace(output_dir=os.path.join(out_dir, "symmetry", arm), diagnostics_every=0, eval_every=0)
