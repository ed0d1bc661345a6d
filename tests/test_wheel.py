"""The package as a user installs it: the wheel built from this checkout, installed into a fresh
virtual environment, used from a folder outside the checkout. Every console script answers
``--help`` and ``unet-train`` runs 2 steps; ``unet`` is imported from the environment, not from
the checkout (which is not on the path there)."""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPTS = ("unet-train", "unet-sample", "unet-evaluate", "unet-export", "unet-phema", "unet-ablation")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the environment's bin folder, a working folder outside the checkout, its environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ and *.egg-info into the folder it builds
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "outputs", "build", "dist", "*.egg-info",
                                                                "wandb", "__pycache__", ".pytest_cache", "tests"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "dist").glob("iddpm_unet-*.whl")
    # The dependencies (torch, diffusers, ...) come from this interpreter's site-packages, as they
    # would from an index; the package itself only from the wheel.
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(tmp / "env")
    bin_dir = tmp / "env" / "bin"
    install = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", WANDB_MODE="offline", HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1")
    return bin_dir, work, env


def test_unet_is_imported_from_the_environment(installed):
    bin_dir, work, env = installed
    code = "import json, unet, unet.cli.train; print(json.dumps([unet.__file__, unet.__version__]))"
    out = subprocess.run([str(bin_dir / "python"), "-c", code], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    path, version = json.loads(out.stdout)
    assert Path(path).is_relative_to(bin_dir.parent) and not Path(path).is_relative_to(ROOT), path
    assert version == __import__("unet").__version__


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_console_script_help(installed, script):
    bin_dir, work, env = installed
    out = subprocess.run([str(bin_dir / script), "--help"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_console_train_runs_two_steps_outside_the_checkout(installed):
    bin_dir, work, env = installed
    out = subprocess.run([str(bin_dir / "unet-train"), "--max_steps", "2", "--batch_size", "8",
                          "--num_res_blocks", "1", "--diffusion_steps", "20", "--report_to", "none",
                          "--progress", "false", "--eval_every", "0", "--sample_every", "-1", "--fid_every", "0",
                          "--diagnostics_every", "0"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = work / "outputs" / "digits"  # the default output_dir, relative to where it ran
    assert (run / "config.yaml").is_file()
    assert [p.name for p in (run / "checkpoints").glob("checkpoint_*")] == ["checkpoint_00000002"]


def test_a_bad_flag_is_one_line_from_the_console_script(installed):
    bin_dir, work, env = installed
    out = subprocess.run([str(bin_dir / "unet-train"), "--learning_rat", "1e-4"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "learning_rate" in out.stderr
