"""Push to the hub (issue 26): ``export.py --push_to_hub`` creates the repository and uploads
the folder through huggingface_hub (patched here at its network boundary, ``HfApi``), the card
carries the hub's metadata, and without a token or network the local folder is still written
and one line says the push did not happen."""

import os

import pytest
import torch
from checkpoint_files import write_checkpoint
from cli_errors import refused
from huggingface_hub import HfApi, ModelCard, constants

from unet.cli.export import main
from unet.config import TrainConfig
from unet.core.model import UNetModel


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = TrainConfig(image_size=8, channel_mult=[1, 2], attention_resolutions=[4], num_res_blocks=1, num_heads=1,
                      diffusion_steps=50, init="standard", report_to="none")
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("push") / "run"
    write_checkpoint(root, cfg, UNetModel(**cfg.model_kwargs()).eval())
    return str(root)


@pytest.fixture
def hub(monkeypatch):
    """HfApi's two network calls recorded instead of sent; a token present."""
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        files = sorted(os.path.relpath(os.path.join(d, f), kw["folder_path"])
                       for d, _, fs in os.walk(kw["folder_path"]) for f in fs)
        calls.append(("upload_folder", kw["repo_id"], {**kw, "files": files}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_sent")
    # CI exports HF_HUB_OFFLINE=1; these tests stand for a machine that is online
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return calls


def test_push_creates_the_repo_and_uploads_the_export_folder(run_dir, hub, tmp_path, capsys):
    out = str(tmp_path / "pipe")
    main([run_dir, out, "--push_to_hub", "--hub_model_id", "someone/digits-ddpm", "--private"])
    assert [c[:2] for c in hub] == [("create_repo", "someone/digits-ddpm"), ("upload_folder", "someone/digits-ddpm")]
    assert hub[0][2]["private"] is True and hub[0][2]["exist_ok"] is True and hub[0][2]["repo_type"] == "model"
    assert hub[1][2]["folder_path"] == out
    assert hub[1][2]["files"] == ["README.md", "guidance.py", "model_index.json", "pipeline.py",
                                  "scheduler/scheduler_config.json", "unet/config.json",
                                  "unet/diffusion_pytorch_model.safetensors"]
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"improved-ddpm", "class-conditional"} <= set(card.data.tags)
    # the snippet loads from the hub repository, and the training config is in the card
    assert "from_pretrained('someone/digits-ddpm', custom_pipeline='someone/digits-ddpm'" in card.text
    assert "diffusion_steps: 50" in card.text
    assert "pushed" in capsys.readouterr().out


def test_without_a_token_the_folder_is_written_and_one_line_says_it_was_not_pushed(run_dir, hub, monkeypatch,
                                                                                   tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    out = tmp_path / "pipe"
    with pytest.raises(SystemExit) as e:
        main([run_dir, str(out), "--push_to_hub", "--hub_model_id", "someone/x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "no Hugging Face token" in err[0] and str(out) in err[0]
    assert (out / "model_index.json").exists() and hub == []


def test_a_network_failure_is_one_line_after_the_folder_is_written(run_dir, hub, monkeypatch, tmp_path, capsys):
    def offline(self, repo_id, **kw):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    out = tmp_path / "pipe"
    with pytest.raises(SystemExit) as e:
        main([run_dir, str(out), "--push_to_hub", "--hub_model_id", "someone/x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "ConnectionError" in err[0] and (out / "README.md").exists()


@pytest.mark.parametrize("argv, words", [
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["--hub_model_id", "a/b"], "go with --push_to_hub"),
    (["--push_to_hub", "--hub_model_id", "a/b/c"], "--hub_model_id 'a/b/c'"),
])
def test_bad_hub_flags_are_one_line_exit_2_before_work(run_dir, hub, tmp_path, capsys, argv, words):
    out = tmp_path / "never"
    assert words in refused(main, [run_dir, str(out), *argv], capsys)
    assert not out.exists() and hub == []


# --- pushing while training (push_to_hub, hub_model_id) ------------------------------------

def _tiny_run(tmp_path, **keys):
    return TrainConfig(output_dir=str(tmp_path / "run"), max_steps=4, checkpoint_every=2, batch_size=8,
                       num_res_blocks=1, diffusion_steps=20, report_to="none", progress=False, eval_every=0,
                       sample_every=-1, fid_every=0, diagnostics_every=0, **keys)


def test_training_pushes_every_checkpoint(tmp_path, hub, capsys):
    from unet.train.loop import train

    summary = train(_tiny_run(tmp_path, push_to_hub=True, hub_model_id="someone/digits-live", hub_private=True))
    assert summary["steps"] == 4
    repo = "someone/digits-live"
    assert [c[:2] for c in hub] == [("create_repo", repo), ("upload_folder", repo)] * 2
    assert hub[0][2]["private"] is True
    pipe = tmp_path / "run" / "pipeline"
    assert hub[1][2]["folder_path"] == str(pipe) and "unet/diffusion_pytorch_model.safetensors" in hub[1][2]["files"]
    assert "someone/digits-live" in (pipe / "README.md").read_text()  # the card loads it from the hub
    out = capsys.readouterr().out
    assert "pushed checkpoint_00000002 to https://huggingface.co/someone/digits-live" in out
    assert "pushed checkpoint_00000004" in out


def test_offline_training_says_so_once_and_trains(tmp_path, monkeypatch, capsys):
    from unet.train.loop import train

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_sent")
    summary = train(_tiny_run(tmp_path, push_to_hub=True, hub_model_id="someone/digits-live"))
    assert summary["steps"] == 4 and summary["stop_reason"] == "max_steps"
    lines = [line for line in capsys.readouterr().out.splitlines() if "push_to_hub" in line]
    assert lines == ["push_to_hub: the Hugging Face hub is in offline mode (HF_HUB_OFFLINE); checkpoints stay local, "
                     "training goes on"]
    assert not (tmp_path / "run" / "pipeline").exists()


def test_a_push_that_fails_on_the_network_is_one_line_per_checkpoint(tmp_path, monkeypatch, capsys):
    """A real connection refused (the hub endpoint pointed at a closed local port)."""

    from unet.train.loop import train

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_sent")
    summary = train(_tiny_run(tmp_path, push_to_hub=True, hub_model_id="someone/digits-live"))
    assert summary["steps"] == 4 and summary["stop_reason"] == "max_steps"
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("push_to_hub: ")]
    assert len(failed) == 2 and all("push to someone/digits-live failed" in f and "training goes on" in f
                                    for f in failed), failed
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()  # the export is kept locally


@pytest.mark.parametrize("keys,words", [
    (dict(push_to_hub=True), "config key 'hub_model_id'"),
    (dict(push_to_hub=True, hub_model_id="no-slash"), "config key 'hub_model_id'"),
    (dict(hub_model_id="someone/x"), "config key 'push_to_hub'"),
])
def test_hub_keys_are_checked_before_anything_starts(keys, words):
    from unet.config import ConfigError

    with pytest.raises(ConfigError, match=words):
        TrainConfig(**keys)
