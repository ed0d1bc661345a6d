"""The benchmark's plumbing (never its speed): both models are the same network, every
figure lands in the JSON, and the FLOP counts match hand counts."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench
from unet.core.model import UNetModel
from unet.sample.export import to_diffusers_state_dict
from unet.train.setup import cpu_compiler


def test_cli_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(
        ["--preset", "tiny", "--json", str(out), "--warmup", "0", "--repeats", "2", "--steps", "1", "--no_memory"]
    )
    r = json.loads(out.read_text())
    assert r["params"]["ours"] == r["params"]["peer"] > 0
    # The same network does the same matmul and conv work, whoever wrote it.
    assert r["flops"]["train"]["ours"] == r["flops"]["train"]["peer"]
    assert r["flops"]["sample"]["ours"] == r["flops"]["sample"]["peer"]
    assert r["flops"]["train"]["ours"] > 2 * r["flops"]["sample"]["ours"] > 0  # backward ~2x forward
    assert r["matmul_peak_flops"] > 0
    for kind in ("train", "sample"):
        for who in ("ours", "peer"):
            assert len(r[kind]["seconds_per_step"][who]) == 2
            assert r[kind]["images_per_second"][who] == pytest.approx(4 / r[kind]["median_seconds"][who])
            assert r[kind]["fraction_of_matmul_peak"][who] > 0
        assert r[kind]["ratio"] == pytest.approx(r[kind]["median_seconds"]["peer"] / r[kind]["median_seconds"]["ours"])
        times = r[kind]["seconds_per_step"]
        assert r[kind]["paired_ratios"] == sorted(p / o for p, o in zip(times["peer"], times["ours"]))
        lo, hi = r[kind]["paired_ratio_ci95"]
        assert lo <= r[kind]["paired_ratio_geomean"] <= hi
    net = r["train"]["network"]
    for who in ("ours", "peer"):
        # The network's share is the step minus the optimizer's, both measured.
        opt = r["train"]["optimizer_seconds_per_step"][who]
        assert all(0 < o < t for o, t in zip(opt, r["train"]["seconds_per_step"][who]))
        assert net["seconds_per_step"][who] == pytest.approx(
            [t - o for t, o in zip(r["train"]["seconds_per_step"][who], opt)]
        )
    assert net["paired_ratios"] == sorted(
        p / o for p, o in zip(net["seconds_per_step"]["peer"], net["seconds_per_step"]["ours"])
    )
    assert r["flush_denormal"] is True and r["complete"] is True


def test_run_saves_what_it_measured_after_each_part():
    """A long run stopped midway keeps its figures: training's before sampling starts."""
    saved = []
    bench.run("tiny", warmup=0, repeats=2, steps=1, memory=False, log=lambda *a: None,
              save=lambda r: saved.append(json.loads(json.dumps(r))))
    assert [s["complete"] for s in saved] == [False, False, True]
    assert "train" in saved[0] and "sample" not in saved[0]
    assert saved[0]["train"]["seconds_per_step"] == saved[-1]["train"]["seconds_per_step"]
    assert "sample" in saved[1] and "sample" in saved[2]


def test_each_model_gets_its_training_scripts_optimizer():
    preset = bench.PRESETS["tiny"]()
    diffusion, batch = bench.make_batch(preset, "cpu")
    ours, peer = (bench.Runner(bench.build(k, preset), diffusion, batch, "cpu", torch.float32,
                               optimizer=bench.OPTIMIZERS[k]) for k in ("ours", "peer"))
    assert ours.opt.defaults["fused"] is True and not peer.opt.defaults["fused"]


def test_paired_ratio_interval_matches_a_hand_computation():
    # log ratios: log 1.1 +- d; mean log 1.1, sd d*sqrt(2), t(0.975, 1) = 12.706
    d = 0.01
    r = bench.compare({"peer": [1.1 * math.exp(-d), 1.1 * math.exp(d)], "ours": [1.0, 1.0]})
    geomean, (lo, hi) = r["paired_ratio_geomean"], r["paired_ratio_ci95"]
    half = 12.7062047 * d * math.sqrt(2) / math.sqrt(2)
    assert geomean == pytest.approx(1.1)
    assert lo == pytest.approx(1.1 * math.exp(-half)) and hi == pytest.approx(1.1 * math.exp(half))


def test_peak_memory_is_measured():
    preset = bench.PRESETS["tiny"]()
    mem = bench.peak_train_memory(preset, "ours", steps=1)
    # At least the parameters, their gradients and AdamW's two moments (fp32).
    assert mem >= 4 * 4 * bench.count_params(bench.build("ours", preset))


def test_conv_flops_match_a_hand_count():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    with FlopCounterMode(display=False) as counter:
        conv(x)
    assert counter.get_total_flops() == 2 * 2 * 16 * 10 * 10 * 8 * 3 * 3


def test_cpu_attention_flops_are_counted():
    """The CPU flash kernel is registered with the counter: QK^T and AV forward (2 matmuls),
    recomputed QK^T plus 4 gradient matmuls backward, each 2*B*H*T*T*D."""
    b, h, t, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * b * h * t * t * d)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 5 * (2 * b * h * t * t * d)


def test_our_attention_takes_the_fused_kernel():
    """A (B, C, T) layout sends SDPA to its math path (bmm's): the counter would see them."""
    preset = bench.PRESETS["tiny"]()
    diffusion, batch = bench.make_batch(preset, "cpu")
    runner = bench.Runner(bench.build("ours", preset), diffusion, batch, "cpu", torch.float32)
    with FlopCounterMode(display=False) as counter:
        runner.train_step()
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert "aten.bmm" not in ops


def test_peer_is_the_same_network():
    """Our weights loaded into the benchmark's diffusers model (strictly, by the export's
    mapping) give our outputs: the benchmark times two implementations of one function."""
    preset = bench.PRESETS["tiny"]()
    ours, peer = bench.build_models(preset)
    torch.manual_seed(0)
    for p in ours.parameters():  # no zero layers, so that every weight matters
        p.data.normal_(0, 0.2)
    peer.unet.load_state_dict(to_diffusers_state_dict(ours), strict=True)
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 50, 99]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        a, b = ours(x, t, y), peer(x, t, y)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


@pytest.mark.skipif(not cpu_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_regional_compilation_computes_the_same_model():
    torch.manual_seed(0)
    eager = UNetModel(in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1, attention_resolutions=(),
                      channel_mult=(1,), use_scale_shift_norm=True, init="standard")
    compiled = UNetModel(in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
                         attention_resolutions=(), channel_mult=(1,), use_scale_shift_norm=True, init="standard")
    compiled.load_state_dict(eager.state_dict())
    assert bench.compile_res_blocks(compiled) == len(compiled.res_blocks()) == 5  # 1 encoder, 2 middle, 2 decoder
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    outs, grads = [], []
    for m in (eager, compiled):
        out = m(x, t)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    # Inductor fuses and reorders float32 sums (GroupNorm statistics, the residual adds);
    # values of order 1 then differ by a few ulps per op, far below 1e-4.
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-5, msg=n)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod prefixes


def test_op_count_counts_each_conv_once_per_forward():
    """benchmarks/op_count.py counts operators at the dispatcher: a sampling forward pass runs
    every conv layer exactly once (tiny's upsample, at 4 px, is not fused), and a training
    step's backward adds operators of its own."""
    from benchmarks.op_count import count_ops

    counts = count_ops("tiny")
    ours, peer = bench.build_models(bench.PRESETS["tiny"]())
    for who, model in (("ours", ours), ("peer", peer)):
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        assert counts[who]["sample"]["aten.convolution"] == convs > 0
        assert counts[who]["train"]["aten.convolution_backward"] > 0
        assert sum(counts[who]["train"].values()) > sum(counts[who]["sample"].values())
