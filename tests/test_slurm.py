"""The batch scripts of scripts/slurm/ under a real SLURM (issue 27): a time limit and a preemption
each end in a signal, a checkpoint, a requeue and a resume with ``--resume auto`` that finishes
bit-identical to an uninterrupted run; two tasks (two "machines" of one process each, gloo on
this host) both get the signal, checkpoint together and resume; a bad configuration fails once,
without a requeue. Every job is submitted at the start and runs side by side with the others
(the partition shares the cores), so the whole module costs about the time-limited job.

    bash scripts/slurm/local_cluster.sh up && python3 -m pytest -q -m slurm

Skipped, with one line, where there is no ``sbatch`` or no cluster answers."""

import json
import os
import re

import pytest
from safetensors.torch import load_file
from slurm_jobs import ROOT, SCRIPTS, TINY, Driver, Job, cluster_problem, runs, slurm

pytestmark = pytest.mark.slurm

ONE, MULTI = "train_one_node.sbatch", "train_multi_node.sbatch"
# Longer than the first run lasts before its time-limit signal (SLURM sends it up to 60 s earlier
# than asked) while the other jobs of the module share the cores with it.
TIME_LIMIT_STEPS = 800
PREEMPT_STEPS, MULTI_STEPS = 200, 120
TIME_LIMIT = ["--time=2", "--signal=B:USR1@60"]
LONG = ["--time=10"]
USR1_AT_40 = (40, ["scancel", "--batch", "--signal=USR1"])


def steps(n, every):
    return f"{TINY} --max_steps {n} --checkpoint_every {every}"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Submit every job at once and drive them until the module ends: {name: Job}."""
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("slurm")
    every = {"time_limit": 200, "preempt": 40, "multi": 40}
    specs = {
        "time_limit": (ONE, steps(TIME_LIMIT_STEPS, every["time_limit"]), TIME_LIMIT, []),
        "time_limit_ref": (ONE, steps(TIME_LIMIT_STEPS, every["time_limit"]), LONG, []),
        # A preemption (the batch shell gets SIGTERM), then a requeue by the administrator
        # (SLURM itself signals every process of the job), then the end.
        "preempt": (ONE, steps(PREEMPT_STEPS, every["preempt"]), LONG,
                    [(40, ["scancel", "--batch", "--signal=TERM"]), (120, ["scontrol", "requeue"])]),
        "preempt_ref": (ONE, steps(PREEMPT_STEPS, every["preempt"]), LONG, []),
        # As SLURM's B:USR1 does before a time limit: to the batch shell, which passes it on.
        # Every checkpoint kept, to look at the one written on the signal.
        "multi": (MULTI, steps(MULTI_STEPS, every["multi"]) + " --keep_checkpoints 10",
                  [*LONG, "--nodes=1", "--ntasks=2", "--ntasks-per-node=2"], [USR1_AT_40]),
        # One launcher of two processes: only the launcher gets the signal.
        "two_processes": (ONE, steps(MULTI_STEPS, every["multi"]) + " --keep_checkpoints 10", LONG, [USR1_AT_40],
                          {"UNET_PROCS": "2"}),
        "bad_config": (ONE, f"{TINY} --max_steps 20 --lr fast", LONG, []),
        # A user's `scancel`: SIGTERM too, but the job must stay cancelled.
        "cancel": (ONE, steps(PREEMPT_STEPS, every["preempt"]) + " --keep_checkpoints 10", LONG,
                   [(40, ["scancel"])]),
    }
    submitted = {name: Job(name, root / name, script, args, sbatch, interrupts, **(env[0] if env else {}))
                 for name, (script, args, sbatch, interrupts, *env) in specs.items()}
    driver = Driver(list(submitted.values()))
    driver.start()
    yield submitted
    driver.stopped.set()
    driver.join()
    assert not driver.errors, driver.errors
    for job in submitted.values():  # nothing of this module left in the queue
        if job.info()["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED"):
            slurm("scancel", job.id, check=False)


def final_files(job):
    """(model weights, EMA weights, train_state.json without its clocks: the training time and each
    sample-quality measurement's seconds) of the run's last checkpoint."""
    folder = os.path.join(job.out, "checkpoints")
    last = os.path.join(folder, max(os.listdir(folder)))
    with open(os.path.join(last, "train_state.json")) as f:
        state = {k: v for k, v in json.load(f).items() if k != "elapsed_seconds"}
    for row in state.get("quality", {}).get("history", []):
        row.pop("seconds")
    return (load_file(os.path.join(last, "model.safetensors")), load_file(os.path.join(last, "ema_0.999.safetensors")),
            state)


def assert_same_files(job, ref):
    (model, ema, state), (model_r, ema_r, state_r) = final_files(job), final_files(ref)
    assert model.keys() == model_r.keys() and all((model[k] == model_r[k]).all() for k in model)  # bit-identical
    assert ema.keys() == ema_r.keys() and all((ema[k] == ema_r[k]).all() for k in ema)
    assert state == state_r  # step, the loss-spike history, the sampler, the EMA step counts, ...


def assert_requeued_runs(job, info, max_steps, tasks=(0,)):
    """The job's log: every run but the last got a signal, was requeued, and the next run resumed
    at exactly the step the run before stopped at (every task at the same step, each reporting
    the signal itself); the first started fresh and the last finished. A signal that comes while
    Python is still starting kills the training process before it can handle it: such a run
    logs neither a resume nor a stop, and the next one resumes where the one before it stopped.
    Returns the runs."""
    all_runs = runs(job.text())
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, job.text()[-3000:])
    assert len(all_runs) >= 2 and int(info["Restarts"]) == len(all_runs) - 1, job.text()[-3000:]
    assert [r["restart"] for r in all_runs] == list(range(len(all_runs)))
    assert all_runs[0]["resumed"] == {}  # a fresh start
    reached = 0
    for run, following in zip(all_runs, all_runs[1:]):
        assert run["signals"] and run["requeued"] is not None and run["exit"] is None, run
        if not run["stopped"]:  # killed while starting: nothing trained, nothing lost
            assert run["resumed"] == {} and run["requeued"][1] > 128, run
            assert following["resumed"] == ({0: reached} if reached else {}), following
            continue
        signal = run["signals"][0][1]
        assert sorted(t for t, _, _ in run["stopped"]) == sorted(tasks), run  # every process got it itself
        stops = {s for _, _, s in run["stopped"]}
        assert {sig for _, sig, _ in run["stopped"]} == {signal} and len(stops) == 1, run
        reached = stops.pop()
        assert following["resumed"] == {0: reached}  # no step repeated, none skipped
    assert all_runs[-1]["exit"] == 0 and all_runs[-1]["requeued"] is None
    assert final_files(job)[2]["step"] == max_steps
    return all_runs


def seconds(a, b):
    return round(b - a, 1)


def test_time_limit_signal_checkpoint_requeue_resume_bit_identical(jobs):
    job, ref = jobs["time_limit"], jobs["time_limit_ref"]
    all_runs = assert_requeued_runs(job, job.wait(600), TIME_LIMIT_STEPS)
    assert all(r["signals"][0][1] == "USR1" for r in all_runs[:-1])  # from --signal=B:USR1@60
    first = all_runs[0]
    lead = first["start"] + 120 - first["signals"][0][0]
    assert first["requeued"][0] < first["start"] + 120, lead  # checkpointed and requeued within the limit
    assert ref.wait(600)["JobState"] == "COMPLETED" and len(runs(ref.text())) == 1
    assert_same_files(job, ref)
    print(f"time limit: signal {lead:.1f} s before the limit; signal to requeue "
          f"{seconds(first['signals'][0][0], first['requeued'][0])} s; requeue to restart "
          f"{seconds(first['requeued'][0], all_runs[1]['start'])} s; runs: {len(all_runs)}")


def test_preemption_and_admin_requeue_resume_bit_identical(jobs):
    job, ref = jobs["preempt"], jobs["preempt_ref"]
    all_runs = assert_requeued_runs(job, job.wait(600), PREEMPT_STEPS)
    assert len(all_runs) == 3 and [r["signals"][0][1] for r in all_runs[:2]] == ["TERM", "TERM"]
    assert [r["requeued"][2] for r in all_runs[:2]] == ["requeueing", "requeued by SLURM"]
    assert ref.wait(600)["JobState"] == "COMPLETED"
    assert_same_files(job, ref)
    for name, run, following in zip(("scancel --signal=TERM", "scontrol requeue"), all_runs, all_runs[1:]):
        print(f"{name}: signal to requeue {seconds(run['signals'][0][0], run['requeued'][0])} s; "
              f"requeue to restart {seconds(run['requeued'][0], following['start'])} s")


def assert_two_processes(job, tasks, launchers):
    """A 2-process job stopped once by SIGUSR1: every launcher passed it on (torchrun handled it
    rather than dying of it), and the checkpoint of the stop and the final one record world size
    2 and hold both processes' RNG states. Returns the runs."""
    all_runs = assert_requeued_runs(job, job.wait(600), MULTI_STEPS, tasks=tasks)
    assert len(all_runs) == 2 and all_runs[0]["signals"][0][1] == "USR1"
    assert sorted(all_runs[0]["forwarded"]) == launchers, job.text()[-3000:]
    step = all_runs[0]["stopped"][0][2]
    for at in (step, MULTI_STEPS):
        folder = os.path.join(job.out, "checkpoints", f"checkpoint_{at:08d}")
        with open(os.path.join(folder, "train_state.json")) as f:
            assert json.load(f)["num_processes"] == 2  # as the run itself recorded it
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(folder))
    return all_runs


def test_two_tasks_both_get_the_signal_checkpoint_together_and_resume(jobs):
    """train_multi_node.sbatch, two tasks (machines 0 and 1 of one process each, gloo on this
    host): both tasks' launchers and training processes got the signal."""
    all_runs = assert_two_processes(jobs["multi"], tasks=(0, 1), launchers=[0, 1])
    print(f"two tasks: signal to requeue {seconds(all_runs[0]['signals'][0][0], all_runs[0]['requeued'][0])} s")


def test_one_launcher_of_two_processes_passes_the_signal_on(jobs):
    """train_one_node.sbatch with UNET_PROCS=2: the batch shell signals the launcher only."""
    all_runs = assert_two_processes(jobs["two_processes"], tasks=(0, 0), launchers=[0])
    print(f"two processes: signal to requeue {seconds(all_runs[0]['signals'][0][0], all_runs[0]['requeued'][0])} s")


def test_bad_config_fails_once_with_status_2_and_is_not_requeued(jobs):
    job = jobs["bad_config"]
    info = job.wait(300)
    text = job.text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
    assert "error: config key 'lr'" in text and "requeueing" not in text
    assert [r["exit"] for r in runs(text)] == [2]
    assert not os.path.exists(os.path.join(job.out, "checkpoints"))


def test_scancel_stops_with_a_checkpoint_and_stays_cancelled(jobs):
    job = jobs["cancel"]
    info = job.wait(300)
    (run,) = runs(job.text())
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    assert run["signals"][0][1] == "TERM" and run["requeued"] is None and run["not_requeued"], run
    (_, signal, step), = run["stopped"]
    assert signal == "TERM" and run["exit"] == 75
    assert os.path.isdir(os.path.join(job.out, "checkpoints", f"checkpoint_{step:08d}"))


def test_docs_show_the_script_files_themselves():
    """docs/cluster.md links every script of scripts/slurm/, and each code block in it that
    looks like a batch script is a verbatim excerpt of one of them, not a copy that can drift."""
    with open(os.path.join(ROOT, "docs", "cluster.md")) as f:
        doc = f.read()
    scripts = {}
    for name in sorted(os.listdir(SCRIPTS)):
        with open(os.path.join(SCRIPTS, name)) as f:
            scripts[name] = f.read()
        assert f"../scripts/slurm/{name}" in doc, f"docs/cluster.md does not link scripts/slurm/{name}"
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", doc, re.S)
    excerpts = [b for b in blocks if "#SBATCH" in b or "trap " in b]
    assert excerpts, "docs/cluster.md shows no part of the scripts"
    for block in excerpts:
        assert any(block in text for text in scripts.values()), f"not an excerpt of scripts/slurm/:\n{block}"
