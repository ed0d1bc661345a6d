"""Several processes and machines on the CPU (issue 12). Two ``accelerate launch`` launchers,
machines 0 and 1 of one job on this host, train together exactly like one 2-process launcher;
a checkpoint written by 2 processes resumes on 1 and one written by 1 resumes on 2, on the same
data stream (the examples, t, noise, flips and label drops of every step), no step repeated or
skipped, and without dropout to weights within float rounding of an uninterrupted run."""

import json
import os
import subprocess
import textwrap

import pytest
import torch
from accelerate.utils import load as accelerate_load
from adam_bounds import assert_adam_close, lrs_used
from safetensors.torch import load_file, save_file
from test_training import ROOT, files_equal, free_port, subprocess_env, tiny

from unet.data.dataset import mixed_seed
from unet.train.checkpoint import latest_checkpoint
from unet.train.loop import train

TESTS = os.path.dirname(os.path.abspath(__file__))
INPUTS = ("x", "y", "t", "w", "noise", "flip", "drop")
LAUNCH = ["accelerate", "launch", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]

WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from test_multinode import record_inputs, save_record
    from unet.config import TrainConfig
    from unet.train.loop import train
    record = record_inputs()
    summary = train(TrainConfig.load(sys.argv[2]), hooks=[lambda step, row, model: record.update(model=model)])
    save_record(record, summary, sys.argv[3])
""")


def record_inputs(patch=setattr):
    """
    Wrap training's ``train_step`` and ``forward_backward`` (with ``patch``: ``setattr``, or a
    monkeypatch's) to keep what this process trains on.

    :return: a dict filled while training: ``inputs[step]`` = one {name: tensor} per
        micro-batch (``INPUTS``: images and labels as loaded, then t, loss weights, noise,
        flips, label drops), ``rng[step]`` = the global RNG state (dropout's) as the step starts.
    """
    import unet.train.loop as tr

    record, real_step, real_fb = {"inputs": {}, "rng": {}}, tr.train_step, tr.forward_backward

    def train_step(run, step, loader):
        record["step"] = step + 1
        record["rng"][step + 1] = torch.get_rng_state()
        return real_step(run, step, loader)

    def forward_backward(run, batch, inputs, skip):
        tensors = dict(zip(INPUTS, (*batch, *inputs)))
        record["inputs"].setdefault(record["step"], []).append({k: v.clone() for k, v in tensors.items()})
        return real_fb(run, batch, inputs, skip)

    patch(tr, "train_step", train_step)
    patch(tr, "forward_backward", forward_backward)
    return record


def save_record(record, summary, out):
    """One process's record (and its model at the end) as ``rank<i>.safetensors`` and
    ``rank<i>.json`` in ``out``, with who it was: world size, process index, machine rank."""
    from accelerate import PartialState

    state = PartialState()
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in record["model"].state_dict().items()}
    for step, micros in record["inputs"].items():
        tensors.update({f"{step}.{m}.{k}": v.contiguous() for m, d in enumerate(micros) for k, v in d.items()})
    tensors.update({f"{step}.rng": v for step, v in record["rng"].items()})
    save_file(tensors, os.path.join(out, f"rank{state.process_index}.safetensors"))
    meta = {"world": state.num_processes, "process": state.process_index, "local": state.local_process_index,
            "machine": int(os.environ.get("GROUP_RANK", -1)), "backend": state.backend,
            "steps": [r["step"] for r in summary["history"]], "losses": [r["loss"] for r in summary["history"]]}
    with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as f:
        json.dump(meta, f)


def load_record(out, rank):
    """``save_record``'s files back: (meta, {"inputs": ..., "rng": ..., "model": ...})."""
    with open(os.path.join(out, f"rank{rank}.json")) as f:
        meta = json.load(f)
    tensors, record = load_file(os.path.join(out, f"rank{rank}.safetensors")), {"inputs": {}, "rng": {}, "model": {}}
    for key, v in tensors.items():
        head, _, rest = key.partition(".")
        if head == "model":
            record["model"][rest] = v
        elif rest == "rng":
            record["rng"][int(head)] = v
        else:
            micro, _, name = rest.partition(".")
            micros = record["inputs"].setdefault(int(head), [])
            micros.extend({} for _ in range(int(micro) + 1 - len(micros)))
            micros[int(micro)][name] = v
    return meta, record


def global_inputs(records):
    """Per step, the global batch: the processes' micro-batches joined as ``batch_slice``
    cuts them (micro-batch major, then process)."""
    steps = records[0]["inputs"]
    return {s: {k: torch.cat([r["inputs"][s][m][k] for m in range(len(steps[s])) for r in records])
                for k in INPUTS} for s in steps}


def assert_same_stream(part, reference):
    """Every step of ``part`` trained on exactly the reference's examples, t, noise, ..."""
    for step, inputs in part.items():
        for k in INPUTS:
            assert torch.equal(inputs[k], reference[step][k]), (step, k)


def launch(machines, worker, cfg_file, out, cpu_threads=None):
    """Start a 2-process job: one launcher with 2 processes (``machines`` 1), or 2 launchers
    of one process each as machines 0 and 1 talking over 127.0.0.1. Returns the Popens."""
    port, env = str(free_port()), subprocess_env(OMP_NUM_THREADS="1")
    cmd = [str(worker), TESTS, str(cfg_file), str(out)]
    if machines == 1:
        args = [["--num_processes", "2", "--num_machines", "1", "--main_process_port", port]]
    else:
        args = [["--num_processes", "2", "--num_machines", "2", "--machine_rank", str(r), "--main_process_ip",
                 "127.0.0.1", "--main_process_port", port] for r in range(2)]
    return [subprocess.Popen([*LAUNCH, *a, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for a in args]


def finish(procs):
    """Wait for every launcher; each must exit 0. Returns their stdouts joined."""
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return "".join(o for o, _ in outs)


def job(tmp_path, name, cfg, machines=1):
    """Run ``cfg`` as a 2-process job and return (stdout, [meta, record] of both processes)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    os.makedirs(cfg.output_dir, exist_ok=True)
    cfg.save(tmp_path / f"{name}.yaml")
    stdout = finish(launch(machines, worker, tmp_path / f"{name}.yaml", cfg.output_dir))
    return stdout, [load_record(cfg.output_dir, r) for r in range(2)]


def config(out):
    # Without dropout, two processes and one compute the same step up to the order in which
    # the gradients are summed.
    return tiny(out, max_steps=4, checkpoint_every=2, dropout=0.0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 steps on one process, in one go: (config, final weights, the global batch per step)."""
    cfg = config(tmp_path_factory.mktemp("one"))
    with pytest.MonkeyPatch.context() as mp:
        record = record_inputs(mp.setattr)
        s = train(cfg)
    assert [r["step"] for r in s["history"]] == [1, 2, 3, 4]
    model = load_file(os.path.join(s["checkpoint"], "model.safetensors"))
    return cfg, model, global_inputs([record])


def test_two_machines_train_together_like_one_two_process_launch(tmp_path):
    """``--num_machines 2 --machine_rank 0|1``: one process per launcher, gloo over 127.0.0.1,
    4 steps in one go; one launcher with 2 processes does 2 steps, then resumes (same process
    count) for 2 more. With dropout, so the per-process RNG streams are compared too.
    Bit-identical needs the same intra-op thread count: a launcher gives its processes
    cores / processes *on its machine* threads, 2 each on this 2-core host when every
    "machine" has one process, and 2 threads sum in another order than 1 (cpu_threads 1 here)."""
    cfg = tiny(tmp_path / "machines", max_steps=4, checkpoint_every=2, dropout=0.1, cpu_threads=1)
    _, machines = job(tmp_path, "machines", cfg, machines=2)
    first = cfg.replace(output_dir=str(tmp_path / "one"), max_steps=2)
    _, one = job(tmp_path, "first", first)
    _, rest = job(tmp_path, "rest", first.replace(max_steps=4, resume="latest"))
    metas = [m for m, _ in machines]
    assert [m["world"] for m in metas] == [2, 2] and [m["backend"] for m in metas] == ["gloo", "gloo"]
    assert [m["process"] for m in metas] == [0, 1] and [m["machine"] for m in metas] == [0, 1]
    assert [m["local"] for m in metas] == [0, 0]  # each alone on its "machine"
    assert [m["machine"] for m, _ in one] == [0, 0] and [m["local"] for m, _ in one] == [0, 1]
    for (m_a, a), (m_b, b), (m_c, c) in zip(machines, one, rest):
        assert m_a["steps"] == m_b["steps"] + m_c["steps"] == [1, 2, 3, 4]  # the resume repeats and skips none
        assert m_a["losses"] == m_b["losses"] + m_c["losses"]
        assert all(torch.equal(a["rng"][s], (b if s <= 2 else c)["rng"][s]) for s in a["rng"])
        assert_same_stream(global_inputs([a]), {**global_inputs([b]), **global_inputs([c])})
        assert all(torch.equal(a["model"][k], c["model"][k]) for k in c["model"])  # bit-identical
    assert not torch.equal(machines[0][1]["rng"][4], machines[1][1]["rng"][4])  # per-process dropout
    assert all(torch.equal(machines[0][1]["model"][k], machines[1][1]["model"][k]) for k in rest[0][1]["model"])
    # Both machines' files went into the one checkpoint, published by machine 0.
    a, c = latest_checkpoint(cfg.output_dir), latest_checkpoint(first.output_dir)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(a))
    assert files_equal(a, c, "model.safetensors") and files_equal(a, c, "ema_0.999.safetensors")


def saved_rng(checkpoint, rank):
    return accelerate_load(os.path.join(checkpoint, f"random_states_{rank}.pkl"))["torch_manual_seed"]


def test_resume_two_processes_onto_one_continues_the_same_stream(uninterrupted, tmp_path, capsys):
    cfg, reference, stream = uninterrupted
    first = cfg.replace(output_dir=str(tmp_path / "run"), max_steps=2)
    _, ranks = job(tmp_path, "first", first)
    assert [m["steps"] for m, _ in ranks] == [[1, 2], [1, 2]]
    assert_same_stream(global_inputs([r for _, r in ranks]), stream)
    checkpoint = latest_checkpoint(first.output_dir)
    with pytest.MonkeyPatch.context() as mp:
        record = record_inputs(mp.setattr)
        rest = train(first.replace(max_steps=4, resume="latest"))
    log = capsys.readouterr().out
    assert [r["step"] for r in rest["history"]] == [3, 4]  # nothing repeated, nothing skipped
    assert_same_stream(global_inputs([record]), stream)
    assert "written by 2 process(es), this run has 1" in log and "process(es) 1 are not used" in log
    assert torch.equal(record["rng"][3], saved_rng(checkpoint, 0))  # process 0 continues its own stream
    resumed = load_file(os.path.join(rest["checkpoint"], "model.safetensors"))
    # Steps 1-2 summed the two halves' gradients in another order than one process does; Adam
    # can turn that rounding in near-zero gradients into lr-sized steps (adam_bounds).
    assert_adam_close(reference, resumed, lrs_used(cfg, 4))


def test_resume_one_process_onto_two_continues_the_same_stream(uninterrupted, tmp_path):
    cfg, reference, stream = uninterrupted
    first = cfg.replace(output_dir=str(tmp_path / "run"), max_steps=2)
    train(first)
    checkpoint = latest_checkpoint(first.output_dir)
    stdout, ranks = job(tmp_path, "rest", first.replace(max_steps=4, resume="latest"))
    assert [m["steps"] for m, _ in ranks] == [[3, 4], [3, 4]]  # nothing repeated, nothing skipped
    assert_same_stream(global_inputs([r for _, r in ranks]), stream)
    assert "written by 1 process(es), this run has 2" in stdout
    assert "process(es) 1 have no saved RNG state and start from their process seed" in stdout
    # The fallback is what the line says: process 0 restores its saved state, process 1 (no
    # file) starts from its process seed exactly as at the start of a fresh run.
    assert torch.equal(ranks[0][1]["rng"][3], saved_rng(checkpoint, 0))
    assert torch.equal(ranks[1][1]["rng"][3], torch.Generator().manual_seed(mixed_seed(cfg.seed, 1) % 2 ** 32)
                       .get_state())
    assert all(torch.equal(ranks[0][1]["model"][k], ranks[1][1]["model"][k]) for k in reference)
    assert_adam_close(reference, ranks[0][1]["model"], lrs_used(cfg, 4))
