"""
Failure definitions, scored after the runs from each run's full record (the runner never stops
a run on any of them). A run stops only at a non-finite loss or at the divergence guard; both
count as failure under every definition.

Each definition says whether it is *start-neutral*: whether it gives the same verdict for every
arm's untrained model. A definition keyed to an absolute bar that one arm starts on (the old
rule's "held-out L_simple above the zero predictor", which a zero-output model sits exactly on
at step 0) is not, and is reported as a descriptive "early progress" measure, never tested.
``tests/test_definitions.py`` applies every definition to real step-0 records of every arm.

A record is a run's ``result.json`` entry: ``stopped`` (None, "non-finite" or "guard"),
``curves.mse`` (the training L_simple of every step) and ``checks`` (``steps`` and ``mse``: the
held-out L_simple at each check, on a fixed batch with t stratified over the schedule and fixed
noise), and ``zero_predictor_loss`` (the held-out L_simple of predicting zero noise).
"""

import math
import statistics

# The guard that stops a run (the one rule that acts during training): the median training
# L_simple of the last GUARD_WINDOW steps above GUARD_FACTOR x the zero predictor's (about 1);
# every untrained model of every arm is near 1, far below it.
GUARD_FACTOR = 10.0
GUARD_WINDOW = 10


def _finite(x):
    return x is not None and math.isfinite(x)


def stopped(record):
    """Non-finite or guard-stopped: failure under every definition."""
    return record.get("stopped") is not None


def late_rise(record, factor=1.5, after=0):
    """The held-out L_simple at some check above ``factor`` x the run's own best at an earlier
    check (relative to the run itself: where an arm starts cannot trigger it)."""
    best = math.inf
    for step, v in zip(record["checks"]["steps"], record["checks"]["mse"]):
        if not _finite(v):
            return True
        if step >= after and v > factor * best:
            return True
        best = min(best, v)
    return False


def spike(record, factor=3.0, window=20):
    """A training L_simple above ``factor`` x the median of the previous ``window`` steps (a full
    window needed: the first ``window`` steps cannot spike)."""
    mse = record["curves"]["mse"]
    for i in range(window, len(mse)):
        if not _finite(mse[i]):
            return True
        prev = [v for v in mse[i - window:i] if _finite(v)]
        if len(prev) == window and mse[i] > factor * statistics.median(prev):
            return True
    return False


def above_zero_predictor(record, until=None):
    """The old rule's first clause, replayed: some held-out check (up to step ``until``) above
    the zero predictor's L_simple. Not start-neutral: a zero-output model starts on the bar."""
    bar = record["zero_predictor_loss"]
    return any(v > bar or not _finite(v) for s, v in zip(record["checks"]["steps"], record["checks"]["mse"])
               if until is None or s <= until)


# name -> (verdict(record) without the stop, start-neutral, what it means). ``failed`` adds the stop.
DEFINITIONS = {
    "diverged": (lambda r: False, True, "non-finite loss or the divergence guard"),
    "late_rise": (late_rise, True, "diverged, or a held-out L_simple above 1.5x the run's own earlier best"),
    "spike": (spike, True, "diverged, or a training L_simple above 3x the median of the previous 20 steps"),
    "old_rule": (lambda r: above_zero_predictor(r) or spike(r), False,
                 "the superseded digits rule, replayed: diverged, a held-out check above the zero predictor, "
                 "or a spike (descriptive: not start-neutral)"),
    "early_progress": (lambda r: above_zero_predictor(r, until=25), False,
                       "not below the zero predictor's held-out L_simple by step 25 (descriptive: where an arm "
                       "starts decides it)"),
}


def failed(record, name):
    """The verdict of definition ``name`` on one run's record."""
    return stopped(record) or bool(DEFINITIONS[name][0](record))


def verdicts(record):
    """{definition: failed?} for every definition."""
    return {name: failed(record, name) for name in DEFINITIONS}


def never_censored(results):
    """Whether the runs come from the never-censoring runner (they carry ``verdicts``)."""
    return all("verdicts" in r for r in results["runs"]) and bool(results["runs"])


def start_neutral(name):
    return DEFINITIONS[name][1]


def final_loss(record, last=3):
    """The continuous endpoint: the mean held-out L_simple of the last ``last`` checks; +inf for
    a stopped run (it ranks worst in every test)."""
    if stopped(record):
        return math.inf
    values = record["checks"]["mse"][-last:]
    return statistics.fmean(values) if values and all(_finite(v) for v in values) else math.inf
