"""
Speed choices made by measuring on the machine at hand, the way cuDNN's benchmark mode picks
convolution algorithms: time the candidates on the real shapes for a few steps and keep the
fastest, once per shape and process. Never chosen by CPU vendor or model name: which layout
wins depends on the instruction set, the core count and the library versions (on 2 cores of
an AVX-512 Intel Xeon channels-last trained the CIFAR models ~7% faster; on 2 cores of an
AVX2 AMD EPYC NCHW did; docs/performance.md).

The one choice made here is the activation and conv-weight layout of a 2-D ``UNetModel``
(``model.set_channels_last``); the outputs are the same either way up to float rounding.
``wait_for`` is the clock's helper for asynchronous devices, shared with the benchmarks.
"""

import contextlib
import statistics
import time

import torch

from unet.core.model import LAYOUTS, MIN_CHANNELS_LAST  # noqa: F401 (the benchmarks read them here)
from unet.utils.stats import paired_ratio_ci

_CHOICES = {}  # (what was measured) -> the fastest candidate's name, for this process
MEASURED = {}  # the same keys -> how the layout was measured (``fastest``'s record), for logs
# Two candidates whose time ratio is known to lie within this of 1 are as good as each other.
SAME_WITHIN = 1.03


def fastest(candidates, key=None, repeats=3, timer=time.perf_counter, cache=_CHOICES, prepare=None,
            max_repeats=None, default=None, record=None):
    """
    The name of the fastest of ``candidates`` (name -> zero-argument callable running one
    step): one untimed call each, then ``repeats`` rounds in which every candidate runs once,
    in an order that flips each round so a slow drift of the machine hits all alike; the
    lowest median wins (ties go to the first). Cached under ``key`` when one is given.

    With ``max_repeats``, rounds go on until the two fastest are told apart: the 95% interval
    of their per-round time ratio (neighbours in time, so blind to slow drift) excludes 1, or
    lies within ``SAME_WITHIN`` of it (too close to matter), or ``max_repeats`` rounds have run.

    :param candidates: an ordered dict of name -> callable.
    :param key: a hashable description of what is measured (shapes, dtype, device, threads).
    :param repeats: timed rounds (the least, with ``max_repeats``).
    :param timer: the clock (a stand-in in tests).
    :param prepare: name -> callable run, untimed, before each of that candidate's calls
        (switching to it), so the switch's cost is not charged to the step.
    :param max_repeats: the most timed rounds (None: exactly ``repeats``).
    :param default: a candidate that keeps its place unless another is measurably faster
        (``_faster``): when the fastest median is another's but the interval of their
        per-round time ratio reaches 1, the measurement has not told them apart and a coin
        toss should not decide (None: the lowest median always wins).
    :param record: a dict to fill with what was measured: ``rounds``, each candidate's median
        ``seconds`` and its per-round time over the chosen one's (``ratio_to_chosen``:
        geometric mean, 95% interval). Left empty when the answer comes from the cache.
    """
    if key is not None and key in cache:
        return cache[key]
    names = list(candidates)
    switch = {name: (prepare or {}).get(name, lambda: None) for name in names}
    for name in names:
        switch[name]()
        candidates[name]()
    seconds = {name: [] for name in names}

    def ranked():
        return sorted(names, key=lambda n: (statistics.median(seconds[n]), names.index(n)))
    for i in range(max(repeats, max_repeats or repeats)):
        if i >= repeats and (len(names) < 2 or _resolved(*(seconds[n] for n in ranked()[:2]))):
            break
        for name in names if i % 2 == 0 else names[::-1]:
            switch[name]()
            start = timer()
            candidates[name]()
            seconds[name].append(timer() - start)
    best = ranked()[0]
    if default in seconds and best != default and not _faster(seconds[best], seconds[default]):
        best = default
    if record is not None:
        record.update(rounds=len(seconds[best]), seconds={n: statistics.median(seconds[n]) for n in names},
                      ratio_to_chosen={n: _time_ratio(seconds[best], seconds[n]) for n in names if n != best})
    if key is not None:
        cache[key] = best
    return best


def _time_ratio(a, b):
    """Per-round times ``b`` over ``a`` (neighbours in time): geometric mean and 95% interval."""
    return paired_ratio_ci([y / x for x, y in zip(a, b)])


def _faster(a, b):
    """Whether per-round times ``a`` are measurably lower than ``b``: the 95% interval of the
    ratio b/a lies above 1 (never with fewer than 2 rounds)."""
    return _time_ratio(a, b)[1] > 1


def _resolved(a, b):
    """Whether per-round times ``a`` and ``b`` are told apart (see ``fastest``)."""
    _, lo, hi = _time_ratio(a, b)
    return lo > 1 or hi < 1 or (lo > 1 / SAME_WITHIN and hi < SAME_WITHIN)


def wait_for(device):
    """Block until ``device`` has run everything queued on it, so that a clock read next sees
    the work and not only its launch. CPU ops run synchronously: nothing to wait for there
    (and ``torch.accelerator.synchronize`` raises on a machine without an accelerator)."""
    device = torch.device(device)
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def layout_key(model, shape, train, autocast=None):
    """What a layout measurement depends on: the network's parameter shapes, the input shape,
    training or sampling, dtypes, device and the thread count."""
    p = next(model.parameters())
    params = tuple(tuple(q.shape) for q in model.parameters())
    return (hash(params), tuple(shape), bool(train), p.dtype, autocast, p.device.type, torch.get_num_threads())


def _step(model, x, timesteps, y, train, autocast):
    kwargs = {"y": y} if y is not None else {}

    def precision():
        return torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()

    def forward_backward():
        with precision():
            loss = model(x, timesteps, **kwargs).float().square().mean()
        loss.backward()
        wait_for(x.device)

    @torch.no_grad()
    def forward():
        with precision():
            model(x, timesteps, **kwargs)
        wait_for(x.device)
    return forward_backward if train else forward


# The layout kept where the measurement cannot tell the two apart (a gap of a few percent on a
# noisy machine): the one that won that mode on every machine measured so far. Sampling ran
# faster channels-last on both an AVX-512 Intel Xeon and an AVX2 AMD EPYC; training went
# channels-last on the one and contiguous on the other, so there the standard layout stays.
# Left to the lower median, a near tie picked the layout that lost to diffusers by 5-7% more
# in the same benchmark (docs/performance.md, item 8).
PREFERRED = {True: "contiguous", False: "channels_last"}

# The most measuring rounds (two steps each) for a training and for a sampling layout choice:
# ~1.7 min of a 4.3 s cifar10 training step, ~1 min of its 1.2 s sampling forward, at worst.
MAX_ROUNDS = {True: 12, False: 24}


def unmeasured_reason(model):
    """Why ``choose_layout`` keeps ``model`` contiguous without timing it (None: it times it)."""
    if model.dims != 2:
        return f"a {model.dims}-D model"
    if model.model_channels < MIN_CHANNELS_LAST:
        return f"{model.model_channels} base channels, under {MIN_CHANNELS_LAST}"
    return None


def choose_layout(model, shape, train=True, timesteps=1000, num_classes=None, repeats=None, autocast=None,
                  cache=_CHOICES):
    """
    Set ``model`` (a ``UNetModel``) to the faster layout for inputs of ``shape`` and return
    it ("channels_last" or "contiguous"). Where the measurement cannot tell the two apart,
    ``PREFERRED`` decides rather than whichever median came out lower. Small models (under
    ``MIN_CHANNELS_LAST`` base channels) and non-2-D ones stay contiguous without measuring.
    The measurement runs on random inputs, leaves no gradients behind and restores the global
    RNG (dropout draws from it), so a run's random stream is the same whichever layout is
    chosen; ``MEASURED[layout_key(...)]`` keeps what it measured.

    :param shape: the input batch's shape, (N, C, H, W).
    :param train: time forward + backward (True) or a forward pass without autograd.
    :param repeats: exactly this many timed rounds. By default at least 3, going on (up to
        ``MAX_ROUNDS``) until the two layouts are told apart (``fastest``): on a noisy machine
        a fixed 3 rounds picked the slower layout, costing 6-7% (docs/performance.md).
    :param timesteps: the diffusion's step count (the timesteps drawn are below it).
    :param num_classes: labels to draw for a class-conditional model.
    :param autocast: the mixed-precision dtype the model will run under (None: none).
    """
    if unmeasured_reason(model):
        model.set_channels_last(False)
        return "contiguous"
    key = layout_key(model, shape, train, autocast)
    if key not in cache:
        was_training = model.training
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g).to(device)
        t = torch.randint(0, timesteps, (shape[0],), generator=g).to(device)
        y = torch.randint(0, num_classes, (shape[0],), generator=g).to(device) if num_classes else None
        step = _step(model, x, t, y, train, autocast)
        names = ("channels_last", "contiguous")
        # Converting the weights is the switch, not the step: it is left out of the timing.
        switch = {name: (lambda on=(name == "channels_last"): model.set_channels_last(on)) for name in names}
        MEASURED[key] = {}
        with torch.random.fork_rng(devices=[]):
            model.train(train)
            try:
                fastest(dict.fromkeys(names, step), key, repeats or 3, cache=cache, prepare=switch,
                        max_repeats=None if repeats else MAX_ROUNDS[bool(train)], default=PREFERRED[bool(train)],
                        record=MEASURED[key])
            finally:
                model.train(was_training)
                model.zero_grad(set_to_none=True)
    model.set_channels_last(cache[key] == "channels_last")
    return cache[key]


def describe_measurement(record):
    """One line on a ``fastest`` record: "channels_last took 1.04x [1.01, 1.07] the time,
    12 rounds" (empty for an empty record: the answer came from the cache or no measuring)."""
    if not record:
        return ""
    others = [
        f"{n} took {g:.3f}x [{lo:.3f}, {hi:.3f}] the time" for n, (g, lo, hi) in record["ratio_to_chosen"].items()
    ]
    return f"{'; '.join(others)}, {record['rounds']} rounds"


def layout_report(model, layout, shape, train=True, autocast=None):
    """The one line a run prints about ``memory_format: auto``: the layout it took for which
    step, and why (what this process measured, or that the model is too small to measure)."""
    step = "training" if train else "sampling"
    skipped = unmeasured_reason(model)
    if skipped:
        why = f"{skipped}: not measured"
    else:
        why = describe_measurement(MEASURED.get(layout_key(model, shape, train, autocast))) or "measured earlier"
    return f"memory_format auto: {layout} for a {step} step at {tuple(shape)} on this machine ({why})"


def apply_layout(model, layout, shape, train=True, timesteps=1000, num_classes=None, autocast=None):
    """The ``memory_format`` setting: "auto" measures (``choose_layout``), the others are
    taken as given. Returns the layout in use."""
    if layout == "auto":
        return choose_layout(model, shape, train, timesteps, num_classes, autocast=autocast)
    model.set_channels_last(layout == "channels_last")
    return layout
