"""
Tolerances for weights compared after AdamW steps, derived from the update rule.

Adam's step is lr x m_hat / (sqrt(v_hat) + eps): about lr per element whatever the gradient's
size. Two computations of the same gradient that differ only by float rounding (compiled vs
eager, one process vs two, one batch vs micro-batches) therefore take nearly the same step
where a gradient element is well above its rounding error, but where it is within rounding
error of zero (sums that cancel, e.g. the biases of zero-initialised layers) the sign and
size of the step are rounding noise: up to lr_t x the bound below per step, in opposite
directions at worst. A real difference (a missing term, a wrong graph, unaveraged gradients)
changes almost every element's gradient, and Adam turns each change into an O(lr) step; so
"all elements within the Adam bound, and all but a few within the rounding of a well-defined
gradient" tells the two cases apart on any CPU.
"""

import math

import torch


def adam_step_bound(t, beta1=0.9, beta2=0.999):
    """The largest |m_hat_t / sqrt(v_hat_t)| Adam can produce at step t (1-based), whatever the
    gradients: Cauchy-Schwarz on the two moving averages gives
    (1-b1)/(1-b1^t) * sqrt((1-b2^t)/(1-b2)) * sqrt(sum_{k<t} (b1^2/b2)^k); 1 at t = 1, 1.004 at t = 3."""
    ratio = sum((beta1 ** 2 / beta2) ** k for k in range(t))
    return (1 - beta1) / (1 - beta1 ** t) * math.sqrt((1 - beta2 ** t) / (1 - beta2)) * math.sqrt(ratio)


def lrs_used(cfg, steps):
    """The learning rate each of the first ``steps`` optimizer steps used under training's
    linear warmup (step t uses lr x min(1, (t-1)/warmup): the schedule is stepped after it)."""
    return [cfg.lr * (min(1.0, (t - 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0) for t in range(1, steps + 1)]


def adam_divergence_bound(lrs):
    """How far apart two AdamW runs (no weight decay) can end, per element, whatever their
    gradients: both take the largest step, in opposite directions, every step."""
    return sum(2 * lr * adam_step_bound(t) for t, lr in enumerate(lrs, 1))


def assert_adam_close(a, b, lrs, grad_rtol=1e-3, max_fraction=1e-4):
    """
    Weights ``a`` and ``b`` ({name: tensor}) after AdamW steps with learning rates ``lrs``,
    from gradients that agree up to float rounding:

    - every element within ``adam_divergence_bound(lrs)``;
    - all but ``max_fraction`` of the elements within what a gradient with relative error
      ``grad_rtol`` changes: grad_rtol x sum_t lr_t x bound_t (Adam's step is scale-free, so a
      relative error of the gradient is the same relative error of the step).

    :return: (largest difference, count beyond the rounding tolerance, element count).
    """
    hard = adam_divergence_bound(lrs)
    bulk = grad_rtol * sum(lr * adam_step_bound(t) for t, lr in enumerate(lrs, 1))
    worst, beyond, total = 0.0, 0, 0
    for k in a:
        d = (a[k].double() - b[k].double()).abs()
        worst = max(worst, d.max().item())
        beyond += int((d > bulk).sum())
        total += d.numel()
    assert a.keys() == b.keys()
    assert worst <= hard, f"weights differ by {worst:.3g}, more than AdamW's bound {hard:.3g}"
    assert beyond <= max_fraction * total, f"{beyond} of {total} elements differ by more than {bulk:.3g}"
    return worst, beyond, total


def float32_update_rounding(steps, weights):
    """Same gradients, differently ordered update arithmetic (fused vs reference AdamW): each
    implementation rounds the weight twice a step (decay, update), half an ulp each, so the two
    drift apart by at most 2 ulps (eps x |w|) a step; the update's own rounding is ~lr x eps, far below."""
    return 2 * steps * torch.finfo(torch.float32).eps * float(weights.abs().max())
