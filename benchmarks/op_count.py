"""
How many ATen operators one step of each model dispatches: our U-Net against diffusers'
``UNet2DModel`` (built as ``benchmarks/bench.py`` builds them), for a training step's forward
and backward (the optimizer left out) and for a sampling forward pass.

    python -m benchmarks.op_count --preset cifar10 --dtype bf16

Where a GPU waits on the host, as both models did in eager mode on an H200 at batch 128
(docs/performance.md, GPU), a step costs about the same per operator whatever its size, so
the count ratio predicts the time ratio. The count is the same on any device: every
operator is counted once as it reaches the ATen dispatcher (after autograd and autocast, so
autocast's casts count too), here on a CPU at batch 2.
"""

import argparse
import collections

from torch.utils._python_dispatch import TorchDispatchMode  # the dispatcher-level hook; no public one

try:
    from benchmarks.bench import DTYPES, OPTIMIZERS, PRESETS, Runner, build_models, make_batch
except ImportError:  # run as a script: benchmarks/ itself is on sys.path, the checkout is not
    from bench import DTYPES, OPTIMIZERS, PRESETS, Runner, build_models, make_batch


class OpCounter(TorchDispatchMode):
    """Counts every ATen operator call made inside it, by operator name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(preset_name, dtype="fp32", batch_size=2):
    """{model: {step kind: Counter of operator calls}} for "ours" and "peer" (diffusers)."""
    preset = PRESETS[preset_name]().replace(batch_size=batch_size)
    diffusion, batch = make_batch(preset, "cpu")
    counts = {}
    for who, model in zip(("ours", "peer"), build_models(preset)):
        runner = Runner(model, diffusion, batch, "cpu", DTYPES[dtype], optimizer=OPTIMIZERS[who])
        def train(runner=runner):  # as a training step starts: no gradients yet
            runner.model.zero_grad(set_to_none=True)
            runner.forward_backward(runner.model)
        steps = {"train": train, "sample": runner.sample_step}
        counts[who] = {}
        for kind, step in steps.items():
            step()  # once untimed, so lazily built state (autocast's weight cache, buffers) is there
            with OpCounter() as counter:
                step()
            counts[who][kind] = counter.counts
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description="ATen operators per step, ours against diffusers' UNet2DModel.")
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype (fp32: none)")
    p.add_argument("--top", type=int, default=5, help="also list the most called operators")
    args = p.parse_args(argv)
    counts = count_ops(args.preset, args.dtype)
    for kind in ("train", "sample"):
        total = {who: sum(counts[who][kind].values()) for who in counts}
        print(f"{args.preset} {kind:6s} ours {total['ours']:5d} ops  diffusers {total['peer']:5d} ops  "
              f"diffusers/ours {total['peer'] / total['ours']:.3f}")
        for who in counts:
            print(f"    {who}: " + ", ".join(f"{n} {c}" for n, c in counts[who][kind].most_common(args.top)))
    return counts


if __name__ == "__main__":
    main()
