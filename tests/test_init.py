"""The init schemes behind the ablation flag, and the symmetry question they answer."""

import pytest
import torch

from unet.core.diffusion import create_diffusion
from unet.core.init import INIT_SCHEMES, apply_init, fixup_scale, zeroed_layers
from unet.core.model import AttentionBlock, ResBlock, UNetModel


def tiny(init="zero", norm="group", num_res_blocks=1, channel_mult=(1, 2), **kw):
    torch.manual_seed(0)
    return UNetModel(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=num_res_blocks,
                     attention_resolutions=(2,), channel_mult=channel_mult, num_heads=2,
                     use_scale_shift_norm=True, num_classes=10, init=init, norm=norm, **kw)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, 16, 16, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )


def record_blocks(model, x, t, y):
    """Each ResBlock's and AttentionBlock's (input, output, skip path) in one forward pass."""
    seen = []

    def hook(module, args, out):
        x_in = args[0]
        skip = module.skip_connection(x_in) if isinstance(module, ResBlock) else x_in
        seen.append((module, out, skip))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    with torch.no_grad():
        out = model(x, t, y)
    for h in handles:
        h.remove()
    return seen, out


def test_zero_init_blocks_are_identity_and_output_is_zero():
    model = tiny("zero")
    seen, out = record_blocks(model, *batch())
    assert len(seen) == 12  # encoder 1 + 2, middle 3, decoder 4 + 2
    for module, block_out, skip in seen:
        assert torch.equal(block_out, skip), type(module).__name__
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(p) == 0 for _, layer in zeroed_layers(model) for p in layer.parameters())


@pytest.mark.parametrize("scheme", ["standard", "kaiming"])
def test_other_schemes_are_not_identity(scheme):
    seen, out = record_blocks(tiny(scheme), *batch())
    for module, block_out, skip in seen:
        assert (block_out - skip).abs().max() > 1e-4, type(module).__name__
    assert out.abs().mean() > 1e-3


def test_schemes_differ_only_where_they_should():
    zero, standard = tiny("zero").state_dict(), tiny("standard").state_dict()
    zeroed = {f"{name}.{p}" for name, _ in zeroed_layers(tiny()) for p in ("weight", "bias")}
    for k in zero:
        if k in zeroed:
            assert torch.count_nonzero(zero[k]) == 0 and torch.count_nonzero(standard[k]) > 0, k
        else:  # same seed, same construction order: the rest is bit-identical
            assert torch.equal(zero[k], standard[k]), k


@pytest.mark.parametrize("scheme", ["zero-branches", "zero-output", "near-zero"])
def test_split_arms_change_only_the_layers_they_name(scheme):
    # Each splits standard from zero by one difference; everything else is standard's, bit for bit.
    arm, standard, zero = (tiny(s).state_dict() for s in (scheme, "standard", "zero"))
    names = [name for name, _ in zeroed_layers(tiny())]
    branch_ends, output = set(names[:-1]), names[-1]
    changed = {"zero-branches": branch_ends, "zero-output": {output}, "near-zero": {*branch_ends, output}}[scheme]
    for k, v in arm.items():
        layer = k.rsplit(".", 1)[0]
        if layer not in changed:
            assert torch.equal(v, standard[k]), k
            if layer not in {*branch_ends, output}:
                assert torch.equal(v, zero[k]), k
        elif scheme == "near-zero":
            torch.testing.assert_close(v, standard[k] * 1e-5, rtol=1e-6, atol=0)  # one float32 product
            assert torch.count_nonzero(v) == torch.count_nonzero(standard[k]), k
        else:
            assert torch.count_nonzero(v) == 0 and torch.count_nonzero(standard[k]) > 0, k


def test_zero_output_model_outputs_zero_but_its_blocks_are_not_identity():
    seen, out = record_blocks(tiny("zero-output"), *batch())
    assert torch.count_nonzero(out) == 0
    assert all((block_out - skip).abs().max() > 1e-4 for _, block_out, skip in seen)
    seen, out = record_blocks(tiny("zero-branches"), *batch())
    assert all(torch.equal(block_out, skip) for _, block_out, skip in seen) and out.abs().mean() > 1e-3


def test_kaiming_statistics():
    model = tiny("kaiming")
    conv = model.input_blocks[1][0].in_layers[2]
    fan_in = conv.weight[0].numel()
    assert abs(conv.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.05
    assert torch.count_nonzero(conv.bias) == 0


def test_unknown_scheme_lists_valid_ones():
    names = "zero, standard, zero-branches, zero-output, near-zero, kaiming, fixup, all-zero"
    with pytest.raises(ValueError, match=f"valid: {names}"):
        tiny("xavier")
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        tiny(norm="batch")
    with pytest.raises(ValueError, match="needs the Fixup scalars"):
        apply_init(tiny("zero"), "fixup")
    assert INIT_SCHEMES == (
        "zero",
        "standard",
        "zero-branches",
        "zero-output",
        "near-zero",
        "kaiming",
        "fixup",
        "all-zero",
    )


def test_norm_none_has_no_groupnorm():
    model = tiny(norm="none")
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in tiny().modules()) > 10


def train_steps(model, steps, lr=1e-3, record=None):
    """AdamW on L_hybrid over a fixed batch; ``record(step)`` runs after each backward."""
    diffusion = create_diffusion(steps=100, noise_schedule="cosine", learn_sigma=True, rescale_learned_sigmas=True)
    x, _, y = batch(8)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        t = torch.randint(0, 100, (8,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        loss = diffusion.training_losses(model, x, t, {"y": y}, noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        if record:
            record(step)
        opt.step()


def distinct_rows(w):
    """Smallest distance between two output channels of a weight."""
    w = w.flatten(1)
    return (torch.cdist(w, w) + torch.eye(len(w)) * 1e9).min().item()


def test_zero_init_breaks_symmetry_step_by_step():
    """A zeroed layer's weight gradient is (upstream gradient) x (its own, non-zero, input), so
    one step makes it non-zero with distinct output channels once any gradient reaches it.
    The output conv is zero too, so the gradient arrives in stages: step 0 trains only the
    output conv; step 1 reaches every zeroed layer (through the skip paths); step 2 every layer."""
    model = tiny("zero")
    zeroed = dict(zeroed_layers(model))
    seen = {}

    def record(step):
        seen[step] = ({n: p.grad.clone() for n, p in model.named_parameters()},
                      {n: m.weight.detach().clone() for n, m in zeroed.items()})

    train_steps(model, 3, record=record)
    nonzero_grad = {s: {n for n, g in grads.items() if torch.count_nonzero(g) > 0} for s, (grads, _) in seen.items()}
    assert nonzero_grad[0] == {"out.2.weight", "out.2.bias"}
    # After one update the output conv is non-zero, with pairwise different output channels.
    assert distinct_rows(seen[1][1]["out.2"]) > 0
    # Step 1: every zeroed layer gets a gradient; the layers inside a branch, behind a zeroed conv, still none.
    assert all(f"{n}.weight" in nonzero_grad[1] for n in zeroed)
    assert "input_blocks.1.0.in_layers.2.weight" not in nonzero_grad[1]
    assert "middle_block.1.qkv.weight" not in nonzero_grad[1]
    # After two updates every zeroed layer is non-zero with pairwise different output channels ...
    for name, w in seen[2][1].items():
        assert torch.count_nonzero(w) > 0 and distinct_rows(w) > 0, name
    # ... and at step 2 every parameter has a non-zero gradient: nothing stays tied or dead.
    assert nonzero_grad[2] == {n for n, _ in model.named_parameters()}


def test_all_zero_init_stays_symmetric():
    """With every weight zero, all channels of a layer compute the same thing, get the same
    gradient and stay identical: the textbook pitfall, still there after 10 steps. (With the
    biases zero too, every activation is exactly 0 and the network is dead, not just tied.)"""
    model = tiny("all-zero")
    train_steps(model, 10)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))}
    for name, conv in convs.items():
        w, b = conv.weight.detach().flatten(1), conv.bias.detach()
        if name == "out.2":  # its outputs are the image channels: only its input columns are tied
            cols = conv.weight.detach().transpose(0, 1).flatten(1)
            assert torch.equal(cols, cols[:1].expand_as(cols)), name
        else:
            assert torch.equal(w, w[:1].expand_as(w)) and torch.equal(b, b[:1].expand_as(b)), name
    # Every activation is 0, so no weight gets a gradient: only the output bias learns.
    assert torch.count_nonzero(model.out[2].bias) == 6
    # and the output channels of a hidden conv are identical on real input
    seen, _ = record_blocks(model, *batch())
    h = seen[0][1]
    assert torch.equal(h, h[:, :1].expand_as(h))


def rms_by_block(model):
    x, t, y = batch(8)
    seen, _ = record_blocks(model, x, t, y)
    return [out.pow(2).mean().sqrt().item() for m, out, _ in seen if isinstance(m, ResBlock)]


def test_fixup_keeps_activation_rms_flat_where_kaiming_grows():
    fixup = rms_by_block(tiny("fixup", norm="none", num_res_blocks=2, channel_mult=(1, 2, 2)))
    kaiming = rms_by_block(tiny("kaiming", norm="none", num_res_blocks=2, channel_mult=(1, 2, 2)))
    msg = (f"ResBlock output RMS, first to last\n fixup:   {[round(r, 2) for r in fixup]}\n"
           f" kaiming: {[round(r, 2) for r in kaiming]}")
    assert max(fixup) / min(fixup) < 2, msg
    assert kaiming[-1] / kaiming[0] > 4, msg


def test_fixup_structure():
    model = tiny("fixup", norm="none")
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    scale = fixup_scale(len(blocks))
    assert scale == pytest.approx(len(blocks) ** -0.5)
    conv = model.input_blocks[1][0].in_layers[2]
    assert abs(conv.weight.std().item() / (scale * (2 / conv.weight[0].numel()) ** 0.5) - 1) < 0.1
    for b in blocks:
        assert torch.count_nonzero(b.fixup_bias) == 0 and b.fixup_scale.item() == 1.0
    seen, out = record_blocks(model, *batch())
    assert all(torch.equal(o, s) for _, o, s in seen) and torch.count_nonzero(out) == 0


def test_init_reads_the_structure_the_model_exposes():
    """No import cycle: ``unet.core.init`` works from ``residual_blocks()``, ``branch_layers()`` and
    ``output_layer()`` alone, and importing it does not import the model."""
    import subprocess
    import sys

    code = "import sys, unet.core.init; assert 'unet.core.model' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    model = tiny()
    blocks = model.residual_blocks()
    assert len(blocks) == 12 and all(isinstance(b, (ResBlock, AttentionBlock)) for _, b in blocks)
    names = [n for n, _ in zeroed_layers(model)]
    assert names[-1] == "out.2" and len(names) == 13
    assert names[0] == f"{blocks[0][0]}.out_layers.3" and f"{blocks[2][0]}.proj_out" in names
