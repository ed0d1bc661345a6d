"""
The zero-init ablation: a grid of short training runs, then report.md, plots and results.json.

    python ablation.py --config configs/ablation/digits.yaml --output_dir outputs/ablation_digits
    python ablation.py --config configs/ablation/digits.yaml --output_dir DIR --processes 2
    python ablation.py --config configs/ablation/digits.yaml --output_dir DIR --init_study   # about a minute
    python ablation.py --output_dir DIR --report_only
    python ablation.py --output_dir DIR --report_only --results docs/ablation/digits_results.json.gz
    python ablation.py --combine DIR1,DIR2 --output_dir DIR

(``python -m unet.ablation ...`` is the same command.) Run it again with the same output_dir
to continue an interrupted grid. Exit status: 0 done, 2 bad command line or grid file, 1 a
data, training or checkpoint error.
"""

import argparse
import difflib
import os
import sys
import time
import uuid

from unet.ablation.grid import load_ablation
from unet.ablation.runner import INVOCATION_ENV, combine, report_only, run_ablation, run_init_study, wandb_group
from unet.ablation.store import drop_claims, spawn_workers
from unet.config import FIELDS, ConfigArgumentParser, ConfigError

ABLATION_OPTIONS = {
    "seeds": "N|a,b,c: a seed count or list (replaces the grid's seeds)",
    "threshold": "X: the training loss that 'steps to threshold' waits for",
    "smooth": "N: the running-mean window of the curves and of steps to threshold",
    "group": "NAME: the wandb group (default: name and start time)",
    "name": "NAME: names the report and the wandb group",
    "save_models": "true|false: keep each run's final checkpoint",
    "processes": "N: processes that split the runs (each with cores / N threads)",
    "early_steps": "a,b,c: the steps of the early-training deficit",
    "stop_after": "MINUTES: start no new run after this many minutes (run the same command again to continue)",
}


def build_parser():
    """The command line: the ablation's own options, then ``--KEY VALUE`` for every training
    config key (applied to every run; values are parsed as the YAML's are)."""
    p = ConfigArgumentParser(
        prog="python -m unet.ablation",
        add_help=False,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
        usage="python -m unet.ablation --config configs/ablation/NAME.yaml --output_dir DIR [--key value ...]",
        epilog="--KEY VALUE: any training config key not varied by the grid, for every run",
    )
    p.add_argument("-h", "--help", action="store_true", help="show this message and exit")
    p.add_argument("--config", metavar="FILE", help="the grid (see configs/ablation/digits.yaml)")
    p.add_argument("--output_dir", metavar="DIR", help="runs, results.json, report.md and plots; run again to continue")
    p.add_argument("--report_only", action="store_true", help="rebuild report.md and plots from DIR/results.json")
    p.add_argument("--results", metavar="FILE", help="with --report_only: the results.json(.gz) to build it from "
                   "(default DIR/results.json), e.g. docs/ablation/digits_results.json.gz")
    p.add_argument("--init_study", action="store_true", help="the init-only scaling study and init memory into "
                   "DIR/init_study.json (about a minute; the report includes it)")
    p.add_argument("--combine", metavar="DIR1,DIR2", help="one report in DIR over finished ablations of the same "
                   "grid with different seeds (their runs pooled)")
    for key, text in ABLATION_OPTIONS.items():
        metavar, _, what = text.partition(": ")
        p.add_argument(f"--{key}", metavar=metavar, help=what)
    for key in FIELDS:
        if key not in ABLATION_OPTIONS and key != "output_dir":
            p.add_argument(f"--{key}", help=argparse.SUPPRESS)
    return p


def parse_args(argv):
    """{option: value} of the given options; a ConfigError (one line) for a bad command line."""
    parser = build_parser()
    opts, rest = parser.parse_known_args(argv)
    if rest:
        key = rest[0][2:].partition("=")[0]
        if not rest[0].startswith("--"):
            raise ConfigError(f"unexpected argument {rest[0]!r}; use --key value")
        if key.replace("-", "_") in {*ABLATION_OPTIONS, *FIELDS}:
            raise ConfigError(f"unknown option '--{key}': did you mean '--{key.replace('-', '_')}'?")
        close = difflib.get_close_matches(key, [*ABLATION_OPTIONS, *FIELDS], n=1)
        hint = f" (did you mean '--{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown option '--{key}'{hint}: use an ablation key ({', '.join(ABLATION_OPTIONS)}) "
                          "or a training config key")
    return vars(opts)


def _run(ab, out_dir, argv, stop_after=0.0):
    """Run the ablation; errors a user can fix (data, config, checkpoint) are one line, exit 1."""
    import datasets

    from unet.data.dataset import DataError
    from unet.train.checkpoint import RunLock
    from unet.train.loop import TrainingError

    datasets.disable_progress_bars()
    workers = []
    # One invocation owns the folder (its rank 0; the workers it starts, and a launcher's other
    # ranks, are part of it): a second one into the same folder is refused instead of both
    # training the same runs and deleting each other's live run folders.
    lock = RunLock(out_dir, "the ablation's output folder") if os.environ.get("RANK", "0") == "0" else None
    try:
        if lock is not None:
            lock.__enter__()
        os.makedirs(out_dir, exist_ok=True)
        ab.group = wandb_group(ab, out_dir)  # one group for the runs of every process
        if os.environ.get("RANK", "0") == "0":  # a worker keeps the id of the invocation that started it
            os.environ[INVOCATION_ENV] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"-{uuid.uuid4().hex[:8]}"
        workers = spawn_workers(
            ab.processes, [sys.executable, "-m", "unet.cli.ablation", *argv, "--group", ab.group], out_dir
        )
        run_ablation(ab, out_dir, command=" ".join(["python -m unet.ablation", *argv]), workers=workers,
                     stop_after=stop_after)
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()  # a failed rank 0 leaves no orphans
        if workers:
            drop_claims()
        if lock is not None:
            lock.__exit__()
    return 0


def _minutes(v):
    try:
        minutes = float(v)
    except (TypeError, ValueError):
        minutes = -1.0
    if not 0 <= minutes < 1e6:
        raise ConfigError(f"--stop_after must be minutes >= 0, got {v!r}")
    return minutes


def main(argv: "list[str] | None" = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
        if opts.pop("help", False):
            print(build_parser().format_help())
            return 0
        out_dir = opts.pop("output_dir", None)
        if not out_dir:
            raise ConfigError("--output_dir DIR is required")
        if opts.pop("report_only", False):
            report_only(out_dir, opts.pop("results", None))
            return 0
        if opts.pop("init_study", False):
            run_init_study(load_ablation(opts.pop("config"), opts), out_dir)
            return 0
        if "combine" in opts:
            combine(out_dir, [d for d in opts.pop("combine").split(",") if d])
            return 0
        stop_after = _minutes(opts.pop("stop_after", 0))
        config = opts.pop("config", None)
        if not config:
            raise ConfigError("--config FILE is required (e.g. configs/ablation/digits.yaml)")
        ab = load_ablation(config, opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run(ab, out_dir, argv, stop_after)


if __name__ == "__main__":
    sys.exit(main())
