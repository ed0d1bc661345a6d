"""The public API (docs/api.md): the names ``from unet import ...`` gives, typed, torch-free to
import, and a 2-step training run, a sample and an export done from Python alone."""

import inspect
import json
import subprocess
import sys
import typing

import numpy as np
import pytest

import unet

PUBLIC_FUNCTIONS = ("run_training", "load_checkpoint", "generate", "export_pipeline", "load_config")


def test_import_unet_loads_no_torch():
    # the command lines import unet first: a bad flag must stay fast and torch-free
    code = ("import json, sys, unet; from unet import TrainConfig; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_every_public_name_resolves():
    for name in unet.__all__:
        assert getattr(unet, name) is not None, name
    assert unet.run_training is __import__("unet.train.loop", fromlist=["train"]).train
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        unet.nope  # noqa: B018


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_functions_have_type_hints(name):
    fn = getattr(unet, name)
    hints = typing.get_type_hints(fn)  # also resolves every string annotation: a wrong one raises here
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    assert "return" in hints and all(p.name in hints for p in params), (name, hints)


def test_train_sample_export_from_python(tmp_path):
    cfg = unet.TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=8, model_channels=32,
                           num_res_blocks=1, diffusion_steps=20, report_to="none", progress=False,
                           eval_every=0, sample_every=-1, fid_every=0, diagnostics_every=0, checkpoint_every=0)
    summary = unet.run_training(cfg)
    assert summary["steps"] == 2 and summary["stop_reason"] == "max_steps" and not summary["diverged"]
    assert set(unet.TrainSummary.__annotations__) == set(summary)
    assert np.isfinite(summary["final_loss"])

    loaded = unet.load_checkpoint(str(tmp_path / "run"))
    assert isinstance(loaded, unet.Loaded) and isinstance(loaded.model, unet.UNetModel)
    images, labels = unet.generate(loaded, 3, steps=2, class_labels=[7], progress=False)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    assert labels.tolist() == [7, 7, 7]
    again, _ = unet.generate(loaded, 3, steps=2, class_labels=[7], progress=False)
    assert np.array_equal(images, again)  # the seed fixes the images

    diff = unet.export_pipeline(loaded, str(tmp_path / "exported"))
    assert diff <= 1e-4 and (tmp_path / "exported" / "model_index.json").is_file()


def test_a_bad_key_from_python_is_a_config_error():
    with pytest.raises(unet.ConfigError, match="config key 'lr'"):
        unet.TrainConfig(lr=-1.0)
