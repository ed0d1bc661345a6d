"""
Throughput of our U-Net against diffusers' ``UNet2DModel`` built with the same architecture,
measured side by side in one process: full training steps (forward, hybrid loss, backward,
AdamW step) and sampling steps (one forward pass), the FLOPs of each, and how close the
achieved FLOP/s come to the machine's own fp32 matmul peak.

    python -m benchmarks.bench --preset cifar-small --json bench.json
    python -m benchmarks.bench --preset cifar10 --device cuda --dtype bf16 --compile

The two models alternate within every repeat (their order flips each repeat) after a warm-up,
so a slow drift of the machine (thermal, another process) hits both alike; the medians over
repeats are reported, and the per-repeat ratios with their geometric mean and 95% interval.
Each model trains with its own training script's optimizer (ours: fused AdamW; diffusers'
example: plain AdamW), timed apart so the forward+backward ratio is reported as well. Peak
memory is measured per model in a fresh subprocess on CPU (peak RSS minus the RSS before the
model is built) and with ``torch.cuda.max_memory_allocated`` on CUDA. Speed is only ever measured here, never in tests.
It is a tool that measures the package, not part of it, hence its place outside ``unet/``.
"""

import argparse
import contextlib
import copy
import multiprocessing as mp
import statistics
import sys
import time

import torch
import torch.nn as nn
from diffusers import UNet2DModel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.layout import LAYOUTS, MEASURED, apply_layout, describe_measurement, layout_key, wait_for
from benchmarks.machine import cpu_name
from unet.config import TrainConfig
from unet.sample.export import check_expressible, unet2d_config
from unet.train.factory import config_from_iddpm_flags, create_diffusion_from_config, create_model
from unet.train.setup import adamw
from unet.utils.jsonfile import write_json
from unet.utils.stats import paired_ratio_ci


def register_cpu_attention_flops():
    """
    Teach ``torch.utils.flop_counter`` the CPU flash-attention kernel that
    ``scaled_dot_product_attention`` runs on CPU (it knows only the CUDA kernels); without it a
    model whose attention takes that path would look cheaper than one that falls back to bmm.
    The kernels have no public handle, only their aten names; a torch without them has
    nothing to register.
    """
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flop)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


def _cpu_sdpa_flop(q, k, v, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward_flop(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


register_cpu_attention_flops()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cifar(model_channels, num_res_blocks, dropout, batch):
    """An improved-DDPM CIFAR-10 model from its flags (32x32, mult 1,2,2,2, attention at 16
    and 8 px, 4 heads, scale-shift norm, learned sigma, cosine schedule over 4000 steps).
    Timesteps are not rescaled, as this benchmark has always run it (speed does not depend on it)."""
    return config_from_iddpm_flags(dict(image_size=32, num_channels=model_channels, num_res_blocks=num_res_blocks,
                                        dropout=dropout, learn_sigma=True, diffusion_steps=4000,
                                        noise_schedule="cosine", rescale_timesteps=False)).replace(batch_size=batch)


def _tiny():
    """A model small enough for a smoke test: 8x8, two levels, attention at the second."""
    return TrainConfig(image_size=8, batch_size=4, channels=3, model_channels=32, num_res_blocks=1,
                       attention_resolutions=[4], channel_mult=[1, 2], num_heads=2, num_classes=3,
                       diffusion_steps=100, rescale_learned_sigmas=False, report_to="none")


# Each preset is a TrainConfig; the benchmark builds from it through unet.train.factory, as training does.
PRESETS = {
    "tiny": _tiny,
    "digits": TrainConfig,  # the default training config (configs/digits.yaml)
    "cifar-small": lambda: _cifar(64, 2, 0.0, 16),
    "cifar10": lambda: _cifar(128, 3, 0.3, 8),  # the paper's CIFAR-10 model (its batch is 128)
}


def compile_res_blocks(model):
    """
    Regional compilation: ``torch.compile`` each of our ResBlocks rather than the whole
    network, so that inductor can fuse the GroupNorm, SiLU, scale-shift and residual sum
    around the convolutions (which it leaves to oneDNN). Each block instance is its own graph
    (22 at cifar-small), more than dynamo's default recompile limit of 8 per code object, so
    the limit is raised here, in the benchmark; on 2 AMD EPYC cores this did not pay off
    (docs/performance.md), so the package does not offer it. Returns the number of blocks.
    """
    import torch._dynamo  # the limit has no public setting

    blocks = [m for _, m in model.res_blocks()]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def describe(preset):
    """The preset as the JSON records it: image size, batch, model and diffusion kwargs."""
    return dict(image_size=preset.image_size, batch_size=preset.batch_size, model=preset.model_kwargs(),
                diffusion=preset.diffusion_kwargs())


# --- the two models ---------------------------------------------------------------------

class PeerAdapter(nn.Module):
    """diffusers' ``UNet2DModel`` behind our ``forward(x, timesteps, y=None)``, so that the
    same diffusion code drives both models."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, y=None):
        return self.unet(x, timesteps, class_labels=y, return_dict=False)[0]


def peer_kwargs(preset):
    """``UNet2DModel`` arguments for the preset's architecture, by the export's mapping
    (``unet.sample.export``; it refuses what diffusers cannot express)."""
    with torch.device("meta"):  # the structure alone: no memory, no init cost
        ours = create_model(preset)
    check_expressible(ours, preset.diffusion_kwargs())
    return unet2d_config(preset.model_kwargs(), preset.image_size, ours)


# Each model trains with the optimizer its own training script uses: our training loop's
# fused AdamW, and the plain torch.optim.AdamW of diffusers' train_unconditional.py.
OPTIMIZERS = {"ours": adamw, "peer": torch.optim.AdamW}


def build(which, preset, peer_config=None):
    """Our ``UNetModel`` ("ours") or diffusers' ``UNet2DModel`` ("peer") for a preset."""
    if which == "ours":
        return create_model(preset)
    return PeerAdapter(UNet2DModel(**(peer_config or peer_kwargs(preset))))


def build_models(preset):
    """(ours, peer) for a preset dict; raises if their parameter counts differ."""
    ours, peer = build("ours", preset), build("peer", preset)
    n_ours, n_peer = count_params(ours), count_params(peer)
    if n_ours != n_peer:
        raise RuntimeError(f"parameter counts differ: ours {n_ours:,}, diffusers {n_peer:,}")
    return ours, peer


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# --- one step of each kind ----------------------------------------------------------------

def make_batch(preset, device, seed=0):
    """A fixed batch: images in [-1, 1], timesteps, noise and (if conditional) labels."""
    g = torch.Generator().manual_seed(seed)
    b, c, s = preset.batch_size, preset.channels, preset.image_size
    diffusion = create_diffusion_from_config(preset)
    batch = dict(x=torch.rand(b, c, s, s, generator=g) * 2 - 1, noise=torch.randn(b, c, s, s, generator=g),
                 t=torch.randint(0, diffusion.num_timesteps, (b,), generator=g))
    if preset.class_cond:
        batch["y"] = torch.randint(0, preset.num_classes, (b,), generator=g)
    return diffusion, {k: v.to(device) for k, v in batch.items()}


class Runner:
    """Holds one model, its optimizer and the batch, and runs timed steps of either kind."""

    def __init__(self, model, diffusion, batch, device, dtype, compile=False, optimizer=torch.optim.AdamW):
        self.model = model.to(device)
        self.diffusion, self.batch, self.device = diffusion, batch, torch.device(device)
        self.fn = torch.compile(self.model) if compile else self.model
        # The optimizer's share is timed apart, so the networks are compared without it too.
        self.opt = optimizer(self.model.parameters(), lr=1e-4)
        self.optimizer_seconds = 0.0
        self.kwargs = {"y": batch["y"]} if "y" in batch else {}
        self.autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext())

    def forward_backward(self, fn):
        """A training step without the optimizer, through ``fn`` (the model as timed, or the
        eager model where counters must see its operators): forward, hybrid loss, backward."""
        self.model.train()
        with self.autocast:
            b = self.batch
            loss = self.diffusion.training_losses(fn, b["x"], b["t"], self.kwargs, b["noise"])["loss"].mean()
        loss.backward()
        return loss

    def train_step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_backward(self.fn)
        self.sync()
        start = time.perf_counter()
        self.opt.step()
        self.sync()
        self.optimizer_seconds += time.perf_counter() - start
        return loss

    @torch.no_grad()
    def sample_step(self):
        self.model.eval()
        with self.autocast:
            b = self.batch
            return self.fn(b["x"], self.diffusion.model_timesteps(b["t"]), **self.kwargs)

    def sync(self):
        wait_for(self.device)

    def time_steps(self, kind, n):
        """Seconds per step and, for training, seconds of it in the optimizer step, both
        averaged over ``n`` steps."""
        step = self.train_step if kind == "train" else self.sample_step
        self.optimizer_seconds = 0.0
        self.sync()
        start = time.perf_counter()
        for _ in range(n):
            step()
        self.sync()
        return (time.perf_counter() - start) / n, self.optimizer_seconds / n

    def flops(self, kind):
        """FLOPs of one step as ``torch.utils.flop_counter`` counts them (forward and backward
        for training; the optimizer's elementwise work is not counted)."""
        counter = FlopCounterMode(display=False)
        with counter:
            if kind == "train":
                self.forward_backward(self.model)  # eager: the counter sees the aten ops, not a compiled graph
            else:
                fn, self.fn = self.fn, self.model
                try:
                    self.sample_step()
                finally:
                    self.fn = fn
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def compare(times):
    """Per-repeat ratios peer/ours and their summary. Each repeat's two timings are
    neighbours in time, so their ratio is blind to the machine's slow drift; the interval
    says how far the figure can be trusted on a noisy machine."""
    paired = sorted(p / o for p, o in zip(times["peer"], times["ours"]))
    geomean, lo, hi = paired_ratio_ci(paired)
    return dict(paired_ratios=paired, paired_ratio_median=statistics.median(paired),
                paired_ratio_geomean=geomean, paired_ratio_ci95=(lo, hi))


def _ci_text(r):
    lo, hi = r["paired_ratio_ci95"]
    return f"geomean {r['paired_ratio_geomean']:.3f}, 95% CI {lo:.3f}-{hi:.3f}"


# --- the machine's limit and memory ---------------------------------------------------------

def matmul_peak(device, dtype, n=None, reps=10):
    """FLOP/s of the best of ``reps`` square ``n x n`` matmuls: the practical peak the
    achieved FLOP/s are compared with (the hardware's nominal peak is higher). By default
    n is 2048 on CPU and 8192 on CUDA, where a 2048 product (~25 us on an H100-class GPU) is
    too short to reach the chip's rate."""
    cuda = torch.device(device).type == "cuda"
    n = n or (8192 if cuda else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        wait_for(device)
        start = time.perf_counter()
        a @ b
        wait_for(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best



def _status_bytes(field):
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _peak_memory_child(preset, which, steps, threads, layout, queue):
    torch.set_num_threads(threads)
    config = peer_kwargs(preset)
    diffusion, batch = make_batch(preset, "cpu")
    # Reset the peak RSS to the current RSS (Linux >= 4.0); ru_maxrss cannot be reset
    # and a spawned child starts with its parent's.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    model = build(which, preset, config)
    if which == "ours":
        model.set_channels_last(layout == "channels_last")
    runner = Runner(model, diffusion, batch, "cpu", torch.float32, optimizer=OPTIMIZERS[which])
    for _ in range(steps):
        runner.train_step()
    queue.put(_status_bytes("VmHWM") - before)


def peak_train_memory(preset, which, steps=2, layout="contiguous"):
    """Peak memory of training ``which`` on CPU, in bytes: the peak RSS of a fresh process
    running ``steps`` training steps, minus its RSS just before the model is built (so
    parameters, gradients, AdamW state and activations count; the interpreter does not)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(preset, which, steps, torch.get_num_threads(), layout, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# --- the benchmark ---------------------------------------------------------------------------

def time_alternating(runners, kind, warmup, repeats, steps):
    """Per-repeat seconds per step (and optimizer seconds) of each model, after ``warmup``
    untimed steps; the models take turns, their order reversing every repeat."""
    for r in runners.values():
        for _ in range(warmup):
            r.train_step() if kind == "train" else r.sample_step()
    names = list(runners)
    times, opt_times = {k: [] for k in names}, {k: [] for k in names}
    for i in range(repeats):
        for k in (names if i % 2 == 0 else names[::-1]):
            seconds, opt_seconds = runners[k].time_steps(kind, steps)
            times[k].append(seconds)
            opt_times[k].append(opt_seconds)
    return times, opt_times


def variant_figures(times, batch_size):
    """Each fixed-layout variant of ours against the peer, timed in the same repeats."""
    out = {}
    for k in times:
        if k not in ("ours", "peer"):
            out[k] = dict(median_seconds=statistics.median(times[k]),
                          images_per_second=batch_size / statistics.median(times[k]),
                          **compare({"peer": times["peer"], "ours": times[k]}))
    return out


def summarize(times, flops, batch_size, peak):
    """Medians, images/s, the median and paired ratios, and the share of the matmul peak."""
    times = {k: times[k] for k in ("ours", "peer")}
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(seconds_per_step=times, median_seconds=med,
                images_per_second={k: batch_size / med[k] for k in med}, ratio=med["peer"] / med["ours"],
                **compare(times), achieved_flops={k: flops[k] / med[k] for k in med},
                fraction_of_matmul_peak={k: flops[k] / med[k] / peak for k in med})


def network_share(times, opt_times, flops, peak):
    """The networks alone: each training step minus its optimizer update."""
    net = {k: [t - o for t, o in zip(times[k], opt_times[k])] for k in ("ours", "peer")}
    net_med = {k: statistics.median(v) for k, v in net.items()}
    return dict(seconds_per_step=net, median_seconds=net_med, **compare(net),
                fraction_of_matmul_peak={k: flops[k] / net_med[k] / peak for k in net_med})


def summary_line(kind, r):
    line = (f"  {kind:6s} ours {r['images_per_second']['ours']:8.1f} img/s  diffusers "
            f"{r['images_per_second']['peer']:8.1f} img/s  ratio {r['ratio']:.3f} (paired {_ci_text(r)})  "
            f"{r['fraction_of_matmul_peak']['ours']:.0%} / {r['fraction_of_matmul_peak']['peer']:.0%} of matmul peak")
    if "network" in r:
        opt = r["optimizer_seconds_per_step"]
        line += (f"\n         forward+backward alone: ratio (paired) {_ci_text(r['network'])}  "
                 f"{r['network']['fraction_of_matmul_peak']['ours']:.0%} / "
                 f"{r['network']['fraction_of_matmul_peak']['peer']:.0%} of matmul peak; optimizer "
                 f"{statistics.median(opt['ours']) * 1e3:.0f} ms (fused AdamW) / "
                 f"{statistics.median(opt['peer']) * 1e3:.0f} ms (AdamW)")
    for name, v in r.get("variants", {}).items():
        line += f"\n         {name}: {v['images_per_second']:.1f} img/s, against diffusers (paired) {_ci_text(v)}"
    return line


def measure_memory(preset, runners, device, layout="contiguous"):
    """(method, {model: peak training bytes}): CUDA's allocator peak over warm steps, or on
    CPU the peak RSS of a fresh process per model."""
    if not device.startswith("cuda"):
        return ("peak RSS (VmHWM) of a fresh process over 2 training steps minus its RSS before the model",
                {k: peak_train_memory(preset, k, layout=layout) for k in ("ours", "peer")})
    peaks = {}
    for k in ("ours", "peer"):
        r = runners[k]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        r.time_steps("train", 2)
        peaks[k] = torch.cuda.max_memory_allocated()
    return "torch.cuda.max_memory_allocated over warm training steps", peaks


def run(preset_name, device="cpu", dtype="fp32", compile=False, warmup=2, repeats=10, steps=2,
        memory=True, batch_size=None, flush_denormal=False, layout="auto", regional_compile=False,
        ab_layouts=False, log=print, save=None):
    """
    Benchmark one preset and return every figure as a JSON-ready dict.

    :param warmup: untimed steps of each kind per model before timing.
    :param repeats: timed repeats; each times ``steps`` steps of ours and of the peer,
        in an order that flips every repeat.
    :param memory: also measure peak training memory.
    :param batch_size: override the preset's batch size.
    :param flush_denormal: recorded only; ``main`` sets it before torch starts its threads.
    :param layout: our model's layout, as the ``memory_format`` config key takes it ("auto"
        measures, separately for training and sampling, as training and sample.py do).
    :param regional_compile: ``torch.compile`` our ResBlocks (``benchmarks.layout.compile_res_blocks``).
    :param ab_layouts: also time ours fixed channels-last and fixed contiguous in the same
        repeats (``variants`` in the JSON), so the layout choice can be checked.
    :param save: called with the figures so far (``complete`` false) after each measured part,
        so that a long run stopped midway keeps what it measured; and once at the end.
    """
    preset = PRESETS[preset_name]()
    if batch_size:
        preset = preset.replace(batch_size=batch_size)
    torch.manual_seed(0)
    diffusion, batch = make_batch(preset, device)
    models = dict(zip(("ours", "peer"), build_models(preset)))
    if ab_layouts:
        for fixed in ("channels_last", "contiguous"):
            models[f"ours_{fixed}"] = copy.deepcopy(models["ours"]).set_channels_last(fixed == "channels_last")

    def choose(train):
        autocast = DTYPES[dtype] if dtype != "fp32" else None
        chosen = apply_layout(models["ours"].to(device), layout, batch["x"].shape, train, diffusion.num_timesteps,
                              preset.num_classes if preset.class_cond else None, autocast)
        measured = (
            MEASURED.get(layout_key(models["ours"], batch["x"].shape, train, autocast)) if layout == "auto" else None
        )
        if measured:
            layouts.setdefault("measured", {})["train" if train else "sample"] = measured
        return chosen, describe_measurement(measured)
    layouts = dict(setting=layout)
    layouts["train"], how = choose(True)
    runners = {
        k: Runner(
            m, diffusion, batch, device, DTYPES[dtype], compile, optimizer=OPTIMIZERS["peer" if k == "peer" else "ours"]
        )
        for k, m in models.items()
    }
    result = dict(
        preset=preset_name, config=describe(preset), device=device,
        device_name=torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
        dtype=dtype, compile=compile, regional_compile=regional_compile, threads=torch.get_num_threads(),
        torch=torch.__version__, flush_denormal=flush_denormal, warmup=warmup, repeats=repeats,
        steps_per_repeat=steps, params={k: count_params(models[k]) for k in ("ours", "peer")}, layout=layouts,
    )
    log(f"{preset_name}: {result['params']['ours']:,} parameters in each model, batch {preset.batch_size}, "
        f"{dtype} on {device}{' compiled' if compile else ''}{' (our ResBlocks compiled)' if regional_compile else ''}")
    result["flops"] = {kind: {k: runners[k].flops(kind) for k in ("ours", "peer")} for kind in ("train", "sample")}
    if regional_compile:  # after the FLOP count, which needs the eager ops
        start = time.perf_counter()
        for k in models:
            if k != "peer":
                compile_res_blocks(models[k])
                runners[k].train_step(), runners[k].sample_step()
        result["regional_compile_seconds"] = time.perf_counter() - start
        log(f"  compiling our ResBlocks (forward and backward, training and sampling): "
            f"{result['regional_compile_seconds']:.0f} s")
    peak = result["matmul_peak_flops"] = matmul_peak(device, DTYPES[dtype])
    for kind in ("train", "sample"):
        if kind == "sample":
            layouts["sample"], how = choose(False)
        log(f"  {kind}: ours {layouts[kind]}" + (f" ({how})" if how else ""))
        times, opt_times = time_alternating(runners, kind, warmup, repeats, steps)
        r = result[kind] = summarize(times, result["flops"][kind], preset.batch_size, peak)
        if kind == "train":
            r["optimizer_seconds_per_step"] = {k: opt_times[k] for k in ("ours", "peer")}
            r["network"] = network_share(times, opt_times, result["flops"][kind], peak)
        r["variants"] = variant_figures(times, preset.batch_size)
        log(summary_line(kind, r))
        if memory and kind == "train":
            # Here, while ours is still in its training layout: the sampling layout may differ,
            # and fused AdamW refuses weights whose strides no longer match its state's.
            result["peak_memory_method"], m = measure_memory(preset, runners, device, layouts["train"])
            result["peak_train_memory_bytes"] = m
            log(f"  memory ours {m['ours'] / 2**20:.0f} MiB  diffusers {m['peer'] / 2**20:.0f} MiB")
        if save:
            save(dict(result, complete=False))
    log(f"  FLOPs per training step {result['flops']['train']['ours'] / 1e9:.2f} G (ours), "
        f"{result['flops']['train']['peer'] / 1e9:.2f} G (diffusers); matmul peak {peak / 1e9:.1f} GFLOP/s")
    result["complete"] = True
    if save:
        save(result)
    return result


def build_parser():
    p = argparse.ArgumentParser(description="Training and sampling throughput of our U-Net vs diffusers' UNet2DModel.")
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--json", default="", help="write every figure to this file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (fp32: none)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="our model's layout (the memory_format config key); auto measures")
    p.add_argument("--regional_compile", action="store_true", help="torch.compile our ResBlocks")
    p.add_argument("--ab_layouts", action="store_true",
                   help="also time ours fixed channels-last and fixed contiguous in the same repeats")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--steps", type=int, default=2, help="steps per model per repeat")
    p.add_argument("--batch_size", type=int, default=0, help="override the preset's batch size")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--keep_denormals", action="store_true",
                   help="do not flush denormal floats to zero on CPU (see docs/performance.md)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.keep_denormals:
        # Zero-initialised layers pass ~1e-12 gradients upstream in the first steps, and
        # AdamW's squares of those are denormals, on which x86 arithmetic is ~18x slower.
        # Set before any parallel op, so torch's worker threads inherit it; both models run
        # under it.
        torch.set_flush_denormal(True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda given but no CUDA device is available")
    try:
        run(args.preset, args.device, args.dtype, args.compile, args.warmup, args.repeats, args.steps,
            not args.no_memory, args.batch_size or None, flush_denormal=not args.keep_denormals,
            layout=args.layout, regional_compile=args.regional_compile, ab_layouts=args.ab_layouts,
            save=(lambda r: write_json(args.json, r, indent=1)) if args.json else None)
    finally:
        torch.set_flush_denormal(False)  # main() may run inside a longer-lived process (tests)


if __name__ == "__main__":
    main()
