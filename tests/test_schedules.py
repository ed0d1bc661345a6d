"""Learning-rate schedules and optimizer keys (issue 26): every schedule is diffusers'
``get_scheduler``, the Adam keys reach the optimizer, resume stays bit-exact under a decaying
schedule, a schedule changed on resume sets the lr its own formula gives, and bad values are
one line with exit status 2."""

import os
import shutil

import pytest
import torch
from diffusers.optimization import SchedulerType, get_scheduler
from test_training import files_equal, stop_and_resume
from test_training import tiny as _tiny

from unet.cli import train as train_script
from unet.config import LR_SCHEDULES
from unet.train.checkpoint import latest_checkpoint
from unet.train.loop import train
from unet.train.setup import make_lr_schedule, make_optimizer, set_tf32


def tiny(out, **kw):
    """test_training's seconds-long run, without the in-training sample-quality measurement."""
    return _tiny(out, **{"fid_every": 0, **kw})


def reference_lrs(name, steps, lr=1e-3, warmup=5, horizon=None, **kw):
    """The lr after each of ``steps`` scheduler steps of diffusers' own schedule on a dummy optimizer
    (inverse_sqrt, which diffusers lacks: EDM2's formula written out)."""
    if name == "inverse_sqrt":
        return [lr * (s / warmup if s < warmup else (max(s / (warmup or 10_000), 1.0)) ** -0.5)
                for s in range(1, steps + 1)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=horizon or steps, **kw)
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def test_the_schedule_names_are_diffusers_own():
    # piecewise_constant is left out: it needs step rules that no key describes; inverse_sqrt is
    # EDM2's, which diffusers does not have (if it gains one, this fails and ours should go)
    assert set(LR_SCHEDULES) == {s.value for s in SchedulerType} - {"piecewise_constant"} | {"inverse_sqrt"}


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_twenty_steps_of_each_schedule_follow_get_scheduler(name, tmp_path):
    kw = dict(num_cycles=2) if name == "cosine_with_restarts" else dict(power=2.0) if name == "polynomial" else {}
    cfg = tiny(tmp_path, max_steps=20, warmup_steps=5, lr_schedule=name, checkpoint_every=0, dropout=0.0,
               lr_cycles=kw.get("num_cycles", 1), lr_power=kw.get("power", 1.0))
    lrs = [r["lr"] for r in train(cfg)["history"]]
    ref = reference_lrs(name, 20, **kw)
    if name == "inverse_sqrt":  # the formula written two ways: equal to float64 rounding
        assert lrs == pytest.approx(ref, rel=1e-12, abs=0)
    else:  # the same formula on the same float inputs: equal, not close
        assert lrs == ref
    if name not in ("constant", "constant_with_warmup"):
        assert lrs[-1] < lrs[5]  # it decays
    if name in ("linear", "cosine"):
        assert lrs[-1] == 0.0  # down to zero at max_steps


def test_adam_keys_reach_the_optimizer_param_groups(tmp_path):
    cfg = tiny(tmp_path, max_steps=2, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, weight_decay=0.01)
    opt = make_optimizer(torch.nn.Linear(2, 2).parameters(), cfg)
    assert [(g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [((0.8, 0.95), 1e-6, 0.01)]
    s = train(cfg)
    groups = torch.load(os.path.join(s["checkpoint"], "optimizer.bin"), weights_only=True)["param_groups"]
    assert all(tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups)


@pytest.mark.parametrize("name", ["cosine", "inverse_sqrt"])
def test_resume_is_bit_identical_with_a_decaying_schedule(tmp_path, name):
    cfg = tiny(tmp_path / "straight", lr_schedule=name, warmup_steps=2)
    full = train(cfg)
    resumed = stop_and_resume(cfg, tmp_path / "resumed")
    a, b = latest_checkpoint(cfg.output_dir), latest_checkpoint(str(tmp_path / "resumed"))
    assert files_equal(a, b, "model.safetensors") and files_equal(a, b, "ema_0.999.safetensors")
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full["history"][3:]]
    ref = reference_lrs(name, 6, warmup=2)
    assert [r["lr"] for r in full["history"]] == (ref if name == "cosine" else pytest.approx(ref, rel=1e-12, abs=0))
    # the 3-step half had its own horizon; resumed with max_steps 6 it continues on the 6-step curve
    assert [r["lr"] for r in resumed["history"]] == [r["lr"] for r in full["history"][3:]]


def test_a_schedule_and_betas_changed_on_resume_apply_to_the_restored_optimizer(tmp_path, capsys):
    cfg = tiny(tmp_path / "run", max_steps=3, warmup_steps=2, dropout=0.0)
    train(cfg)
    s = train(cfg.replace(max_steps=8, resume="latest", lr_schedule="linear", adam_beta2=0.99))
    out = capsys.readouterr().out
    assert "resume: lr_schedule changed from 'constant_with_warmup' to 'linear'" in out
    assert "resume: adam_beta2 changed from 0.999 to 0.99" in out
    ref = reference_lrs("linear", 8, warmup=2)
    assert f"resume: lr at step 3 is now {ref[2]:.6g} (was 0.001)" in out
    assert [r["lr"] for r in s["history"]] == ref[3:]
    groups = torch.load(os.path.join(s["checkpoint"], "optimizer.bin"), weights_only=True)["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.99) for g in groups)


def test_the_schedule_object_is_get_schedulers_and_tf32_is_a_no_op_on_a_cpu(tmp_path):
    cfg = tiny(tmp_path, lr_schedule="polynomial", lr_power=2.0, max_steps=10, warmup_steps=0)
    opt = make_optimizer(torch.nn.Linear(2, 2).parameters(), cfg)
    sched = make_lr_schedule(opt, cfg)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == reference_lrs("polynomial", 10, warmup=0, power=2.0)
    before = torch.backends.cuda.matmul.fp32_precision
    logged = []
    set_tf32(cfg.replace(allow_tf32=True), torch.device("cpu"), logged.append)
    assert logged == ["allow_tf32: no effect on a cpu device"] and torch.backends.cuda.matmul.fp32_precision == before


@pytest.mark.parametrize("argv, words", [
    (["--lr_schedule", "inverse_cube"], ["'lr_schedule'", "constant|constant_with_warmup|linear|cosine"]),
    (["--adam_beta1", "1.0"], ["'adam_beta1'", "[0, 1)"]),
    (["--adam_beta2", "-0.1"], ["'adam_beta2'", "[0, 1)"]),
    (["--adam_eps", "0"], ["'adam_eps'", "> 0"]),
])
def test_bad_schedule_and_betas_are_one_line_exit_2_before_work(argv, words, tmp_path, capsys):
    out = tmp_path / "never"
    assert train_script.main(["--output_dir", str(out), *argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not out.exists()
    shutil.rmtree(out, ignore_errors=True)
