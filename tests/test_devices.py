"""One device rule for every command, and the one cross-process agreement."""

import subprocess
import sys

import torch

from unet.core.model import UNetModel, apply_layout, resolve_layout
from unet.utils import devices


def test_commands_use_any_accelerator_torch_has_not_only_cuda(monkeypatch):
    # sample.py and evaluate used to ask torch.cuda, which sends an MPS or XPU machine to the CPU.
    seen = {}
    monkeypatch.setattr(devices.torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "Accelerator", lambda **kw: seen.update(kw) or "acc")
    assert devices.device_accelerator(mixed_precision="no") == "acc"
    assert seen == {"cpu": False, "mixed_precision": "no"}
    monkeypatch.setattr(devices.torch.accelerator, "is_available", lambda: False)
    devices.device_accelerator()
    assert seen["cpu"] is True


def test_sample_and_evaluate_pick_the_device_through_the_one_rule():
    for script in ("sample.py", "evaluate.py"):
        with open(f"unet/cli/{script}") as f:
            text = f.read()
        assert "device_accelerator()" in text and "cuda.is_available" not in text, script


def test_any_process_on_one_process_reads_bools_and_tensors():
    class One:
        num_processes, device = 1, torch.device("cpu")

    assert devices.any_process(One(), True) and not devices.any_process(One(), False)
    assert devices.any_process(One(), torch.tensor([True])) and not devices.any_process(One(), torch.tensor(False))


def test_layout_rule_trains_contiguous_and_samples_wide_models_channels_last():
    wide = UNetModel(in_channels=3, model_channels=64, out_channels=3, num_res_blocks=1, attention_resolutions=())
    narrow = UNetModel(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=())
    assert not wide.channels_last  # built in the standard layout, whatever its width
    assert resolve_layout(wide, "auto", train=True) == "contiguous"
    assert resolve_layout(wide, "auto", train=False) == "channels_last"
    assert resolve_layout(narrow, "auto", train=False) == "contiguous"
    assert resolve_layout(narrow, "channels_last", train=True) == "channels_last"  # asked for: taken as given
    assert apply_layout(wide, "auto", train=False) == "channels_last" and wide.channels_last
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        a = wide(x, t)
        apply_layout(wide, "contiguous", train=False)
        b = wide(x, t)
    assert not wide.channels_last
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float rounding of another kernel order only


def test_benchmark_rows_are_checked_under_python_O(tmp_path):
    # The check used to be an assert, which python -O strips.
    bad = tmp_path / "rows.json"
    bad.write_text('[{"scheduler": "ddpm"}]')
    code = ("import sys\nfrom unet.evaluation.samplers import read_rows\n"
            f"try:\n    read_rows({str(bad)!r})\nexcept ValueError as e:\n    print(e)\n    sys.exit(0)\nsys.exit(1)")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "expected the JSON rows" in out.stdout
