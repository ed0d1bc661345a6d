"""Settings a user made outside the config are respected: the mixed precision that `accelerate
launch` / `accelerate config` chose when the config says nothing (the config wins when it does,
a resumed run keeps its own), wandb online when wandb finds a login (offline otherwise,
WANDB_MODE always winning), each said in one log line; and TF32 switches that exist on every
torch the package allows."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_training import subprocess_env, tiny

from unet.checkpoint.format import read_config_mapping
from unet.train.checkpoint import latest_checkpoint
from unet.train.setup import set_tf32

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# test_training's seconds-long run, as command-line flags
TINY = ["--max_steps", "2", "--batch_size", "8", "--num_res_blocks", "1", "--diffusion_steps", "20",
        "--report_to", "none", "--progress", "false", "--checkpoint_every", "2", "--log_every", "1",
        "--diagnostics_every", "0", "--eval_every", "0", "--sample_every", "-1", "--fid_every", "0",
        "--warmup_steps", "0"]
LAUNCH = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
# A key of the right shape for wandb, and nothing else: no server ever sees it (the tests block the network).
FAKE_KEY = "0123456789" * 4


def env_for(home=None, **extra):
    """The tests' environment without accelerate's precision or any wandb key, mode or netrc path;
    ``home``: a HOME of the test's own (wandb reads ``~/.netrc`` and ``~/.config/wandb`` there)."""
    env = {k: v for k, v in subprocess_env().items() if k not in ("ACCELERATE_MIXED_PRECISION", "NETRC")}
    if home is not None:
        os.makedirs(home, exist_ok=True)
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), WANDB_CONFIG_DIR=str(home / "wandb-config"))
    env.update(extra)
    return env


def train_cli(args, env, launch=()):
    return subprocess.run([*launch, *([] if launch else [sys.executable]), "train.py", *TINY, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def precision_line(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("mixed_precision: ")]
    assert len(lines) == 1, stdout[-3000:]
    return lines[0]


def saved_precision(out):
    return read_config_mapping(latest_checkpoint(str(out)))["mixed_precision"]


def test_accelerate_launch_precision_is_used_when_the_config_is_silent_and_kept_on_resume(tmp_path):
    out = tmp_path / "run"
    r = train_cli(["--output_dir", str(out)], env_for(), launch=[*LAUNCH, "--mixed_precision", "bf16"])
    assert r.returncode == 0, r.stderr[-3000:]
    line = precision_line(r.stdout)
    assert line.startswith("mixed_precision: bf16 (from accelerate: ACCELERATE_MIXED_PRECISION=bf16"), line
    assert saved_precision(out) == "bf16"  # what the run used, not "auto": resume and sampling read it

    # resumed without accelerate launch (accelerate would say "no"): the checkpoint's precision is kept
    r = train_cli(["--output_dir", str(out), "--resume", "latest", "--max_steps", "4"], env_for())
    assert r.returncode == 0, r.stderr[-3000:]
    assert precision_line(r.stdout).startswith("mixed_precision: bf16 (the checkpoint's"), r.stdout[-2000:]
    assert saved_precision(out) == "bf16"

    # accelerate asking for another precision on resume is refused in one line, as the config would be
    r = train_cli(["--output_dir", str(out), "--resume", "latest", "--max_steps", "6"],
                  env_for(ACCELERATE_MIXED_PRECISION="fp16"))
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]
    assert "was trained with bf16 and accelerate asks for fp16" in err[0] and "mixed_precision: bf16" in err[0]


def test_the_config_wins_over_accelerates_precision(tmp_path):
    out = tmp_path / "run"
    r = train_cli(["--output_dir", str(out), "--mixed_precision", "no"], env_for(ACCELERATE_MIXED_PRECISION="bf16"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert precision_line(r.stdout) == "mixed_precision: no (set in the config)"
    assert saved_precision(out) == "no"


def test_without_credentials_wandb_goes_offline_and_says_why(tmp_path):
    # A HOME with no netrc and no WANDB_API_KEY: wandb finds no login, and neither precision is set.
    out = tmp_path / "run"
    r = train_cli(["--output_dir", str(out), "--report_to", "wandb"], env_for(tmp_path / "home"))
    assert r.returncode == 0, r.stderr[-3000:]
    offline = [ln for ln in r.stdout.splitlines() if ln.startswith(("wandb offline", "wandb online"))]
    assert len(offline) == 1 and offline[0].startswith("wandb offline (no credentials for "), r.stdout[-3000:]
    assert "`wandb login` or WANDB_API_KEY logs online" in offline[0] and "wandb sync" in offline[0]
    assert any(n.startswith("offline-run-") for n in os.listdir(out / "wandb"))
    assert precision_line(r.stdout) == ("mixed_precision: no (accelerate's default: neither the config nor "
                                        "accelerate sets it)")


# Blocks every network connection and name lookup of the process (local sockets still work),
# recording the attempts, then asks wandb_mode() as a run would.
ASK_WANDB = textwrap.dedent("""
    import json, socket
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(repr(address))
            raise OSError("network blocked by the test")
        return real_connect(self, address)

    def getaddrinfo(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network blocked by the test")

    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    from unet.train.tracking import wandb_mode
    print(json.dumps({"mode": wandb_mode(), "attempts": attempts}))
""")


def ask_wandb(env):
    r = subprocess.run([sys.executable, "-c", ASK_WANDB], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_wandb_goes_online_with_the_key_wandb_login_saved_without_contacting_a_server(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    (home / ".netrc").chmod(0o600)
    asked = ask_wandb(env_for(home))
    (mode, why), attempts = asked["mode"], asked["attempts"]
    assert mode == "online" and "netrc" in why and FAKE_KEY not in why, asked
    assert attempts == []  # nothing was verified against a server
    # WANDB_MODE set by the user wins over the login
    asked = ask_wandb(env_for(home, WANDB_MODE="offline"))
    assert asked["mode"] == ["offline", "WANDB_MODE is set"] and asked["attempts"] == []
    # and without the netrc, the same HOME is offline
    (home / ".netrc").unlink()
    asked = ask_wandb(env_for(home))
    assert asked["mode"][0] == "offline" and "no credentials" in asked["mode"][1] and asked["attempts"] == []


ABLATION_TRACKER = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    from unet.train.tracking import wandb_offline_setup
    mode = wandb_offline_setup()
    acc = Accelerator(log_with="wandb", project_dir=sys.argv[1])
    acc.init_trackers("p", init_kwargs={"wandb": {"dir": sys.argv[1]}})
    run_mode = acc.get_tracker("wandb", unwrap=True).settings.mode
    acc.end_training()
    print(json.dumps([mode, run_mode]))
""")


def test_the_ablations_wandb_runs_go_offline_without_credentials(tmp_path):
    # The ablation's group runs are started by accelerate with no mode: wandb_offline_setup must
    # leave wandb offline after asking it for credentials (which reads, and caches, its settings).
    r = subprocess.run([sys.executable, "-c", ABLATION_TRACKER, str(tmp_path / "out")], cwd=ROOT,
                       env=env_for(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (mode, why), run_mode = json.loads(r.stdout.strip().splitlines()[-1])
    assert (mode, run_mode) == ("offline", "offline") and "no credentials" in why


@pytest.fixture
def tf32_switches():
    """Whether this torch has the fp32_precision switches (2.9+); restores the TF32 settings after the test."""
    new = hasattr(torch.backends.cudnn, "conv")
    matmul, conv = (torch.backends.cuda.matmul, torch.backends.cudnn.conv) if new else (None, None)
    before = (matmul.fp32_precision, conv.fp32_precision) if new else \
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield new
    if new:
        matmul.fp32_precision, conv.fp32_precision = before
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("on", [True, False])
def test_tf32_uses_torchs_fp32_precision_switches_where_they_exist(on, tf32_switches, tmp_path):
    if not tf32_switches:
        pytest.skip("torch before 2.9 has no fp32_precision switches")
    logged = []
    set_tf32(tiny(tmp_path, allow_tf32=on), torch.device("cuda"), logged.append)  # a flag: no GPU needed to set it
    precision = "tf32" if on else "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == precision
    assert torch.backends.cudnn.conv.fp32_precision == precision
    assert logged == [f"allow_tf32: {'on' if on else 'off'} (float32 matmuls and convolutions in {precision})"]


@pytest.mark.parametrize("on", [True, False])
def test_tf32_falls_back_to_allow_tf32_on_a_torch_before_2_9(on, tf32_switches, monkeypatch, tmp_path):
    # torch 2.6-2.8 (which pyproject allows) have no torch.backends.cudnn.conv: setting it would fail at start.
    if tf32_switches:
        monkeypatch.delattr(type(torch.backends.cudnn), "conv")
    assert not hasattr(torch.backends.cudnn, "conv")
    logged = []
    set_tf32(tiny(tmp_path, allow_tf32=on), torch.device("cuda"), logged.append)
    assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
    assert len(logged) == 1 and logged[0].startswith(f"allow_tf32: {'on' if on else 'off'}")
