"""U-Net behaviour beyond the fixture: gradient checkpointing, other dims, argument errors."""

import pytest
import torch

from unet.core.model import UNetModel


def make(**kw):
    torch.manual_seed(0)
    args = dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(2,),
                channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True, init="standard", dropout=0.0)
    return UNetModel(**{**args, **kw})


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    grads = []
    for use_checkpoint in (False, True):
        m = make(use_checkpoint=use_checkpoint)
        m(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 16)), (3, (2, 3, 2, 8, 8))])
def test_other_dims(dims, shape):
    m = make(dims=dims)
    out = m(torch.randn(*shape), torch.tensor([1, 2]))
    assert out.shape == shape


def test_attention_heads():
    m = make(num_heads=4, num_heads_upsample=2)
    assert m.middle_block[1].num_heads == 4 and m.output_blocks[0][1].num_heads == 2
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        make(num_heads=3)


def test_class_conditioning():
    m = make(num_classes=10)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    a, b = m(x, t, torch.tensor([0, 0])), m(x, t, torch.tensor([0, 1]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        m(x, t)


def test_dropout_is_bernoulli_with_the_inverted_scale():
    """The CPU fast path draws its own mask: it must still keep each value with probability
    1 - p, scale kept values by exactly 1 / (1 - p), pass the same mask to the gradient,
    follow the global seed, and be the identity in eval mode."""
    from unet.core.nn import Dropout

    p, n = 0.3, 200_000
    drop = Dropout(p)
    x = torch.rand(n) + 0.5  # no zeros, so a zero in the output is a dropped value
    torch.manual_seed(1)
    y = drop(x)
    kept = y != 0
    # Binomial(n, 0.7): sd = 0.001 on the fraction, so 5 sd is 0.005.
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    assert torch.equal(y[kept], x[kept] * (1 / (1 - p)))
    torch.manual_seed(1)
    assert torch.equal(drop(x), y)  # same seed, same mask
    assert not torch.equal(drop(x), y)  # the generator moved on

    xg = x.clone().requires_grad_()
    torch.manual_seed(2)
    out = drop(xg)
    out.backward(torch.ones(n))
    scale = torch.tensor(1 / (1 - p))  # the gradient is the mask: the scale where kept, else 0
    assert torch.equal(xg.grad, torch.where(out.detach() != 0, scale, 0.0))
    drop.eval()
    assert drop(x) is x
    assert Dropout(0.0)(x) is x and torch.equal(Dropout(1.0)(x), torch.zeros(n))


def test_dropout_in_the_model_only_when_training():
    m = make(dropout=0.5)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    m.eval()
    assert torch.equal(m(x, t), m(x, t))
    m.train()
    assert not torch.equal(m(x, t), m(x, t))


def test_conv_weights_live_channels_last_but_state_dicts_are_standard(tmp_path):
    from safetensors.torch import load_file, save_file

    m = make(model_channels=64).set_channels_last(True)  # as sampling runs it from 64 channels up
    conv = m.input_blocks[0][0].weight
    assert m.channels_last and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    sd = m.state_dict()
    assert all(v.is_contiguous() for v in sd.values())
    assert torch.equal(sd["input_blocks.0.0.weight"], conv.detach())
    save_file(sd, tmp_path / "m.safetensors")  # refuses non-contiguous tensors
    m2 = make(init="kaiming", model_channels=64).set_channels_last(True)
    m2.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    assert torch.equal(m.eval()(x, t), m2.eval()(x, t))
    assert m2.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(m.state_dict(keep_vars=True)["input_blocks.0.0.weight"], torch.nn.Parameter)


def test_channels_last_is_a_layout_not_a_different_function():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    small = make()
    assert not small.channels_last and small.input_blocks[0][0].weight.is_contiguous()  # 32 channels: NCHW
    ref = small.eval()(x, t)
    small.set_channels_last(True)
    w = small.input_blocks[0][0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert torch.allclose(small(x, t), ref, rtol=1e-5, atol=1e-5)  # summation order differs by layout
    assert small.set_channels_last(False)(x, t).allclose(ref, rtol=1e-5, atol=1e-5)  # summation order differs by layout
    with pytest.raises(ValueError, match="2-D data"):
        make(dims=1).set_channels_last(True)


def _upsample_then_conv(x, w, b):
    return torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), w, b,
                                      padding=1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(8, 11), (4, 4)])
def test_upsample_conv_is_nearest_upsampling_then_the_3x3_conv(channels_last, size):
    """``Upsample`` (fused above SUBPIXEL_MIN_SIZE, two ops below it) against the two ops
    in float64: output and the gradients of input, weight and bias. Every figure is a sum of
    n products in float32, so each must lie within (n + 2) * eps times the same sum taken over
    absolute values (the first-order float summation bound), in whatever order it was summed."""
    from unet.core.model import Upsample
    torch.manual_seed(0)
    up = Upsample(5, use_conv=True)
    x, g = torch.randn(2, 5, *size), torch.randn(2, 5, 2 * size[0], 2 * size[1])
    if channels_last:
        up, x = up.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = up(x)
    assert out.shape == g.shape and out.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    got = [out, *torch.autograd.grad(out, (x, up.conv.weight, up.conv.bias), g)]

    def in_float64(absolute):
        f = torch.abs if absolute else (lambda t: t)
        x64, w64, b64 = (f(t.detach().double()).requires_grad_() for t in (x, up.conv.weight, up.conv.bias))
        y = _upsample_then_conv(x64, w64, b64)
        return [y, *torch.autograd.grad(y, (x64, w64, b64), f(g.double()))]

    terms = [5 * 9 + 1, 5 * 9 * 4, 2 * 4 * size[0] * size[1], 2 * 4 * size[0] * size[1]]  # products per figure
    eps = torch.finfo(torch.float32).eps
    for name, a, ref, ref_abs, n in zip(("output", "grad x", "grad weight", "grad bias"), got, in_float64(False),
                                        in_float64(True), terms):
        err = (a.double() - ref).abs()
        assert (err <= (n + 2) * eps * ref_abs + 1e-30).all(), (name, (err / ref_abs).max().item())


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_traces_the_whole_unet_as_one_graph(channels_last):
    """A graph break in the U-Net's block loop makes dynamo skip the whole forward and compile
    each block apart (one recompile per shape, past its limit of 8): compiled, the model ran
    no faster than eager on a GPU (docs/performance.md). ``fullgraph=True`` turns any break
    into an error; the "eager" backend traces without compiling and runs the same ops."""
    torch._dynamo.reset()
    m = make(model_channels=64, channel_mult=(1, 2), num_classes=3, dropout=0.1).set_channels_last(channels_last)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 2])  # fused upsample at 8 px
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled.eval()(x, t, y), m(x, t, y))
    torch.manual_seed(1)
    out = compiled.train()(x, t, y)
    out.square().mean().backward()
    torch.manual_seed(1)
    assert torch.equal(out, m(x, t, y))
