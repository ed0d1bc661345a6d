"""Evaluation: the Frechet distance against an independent formula, the digit judge on real,
noise and mislabelled digits, bits/dim independent of batching, and the command lines."""

import json

import numpy as np
import pytest
import torch
from checkpoint_files import write_checkpoint
from cli_errors import refused

from unet.cli.evaluate import main
from unet.config import TrainConfig
from unet.core.diffusion import create_diffusion
from unet.core.model import UNetModel
from unet.evaluation.fid import fid_unavailable_reason
from unet.evaluation.held_out import bits_per_dim, held_out_losses
from unet.evaluation.judge import digit_quality
from unet.evaluation.metrics import frechet_distance
from unet.evaluation.quality import digit_reference
from unet.evaluation.samplers import format_table, guidance_differences, summarize_seeds


def test_frechet_distance_matches_eigenvalue_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(loc=0.5, size=(300, 5)) @ rng.normal(size=(5, 5))
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b.
    tr_sqrt = np.sqrt(np.linalg.eigvals(s_a @ s_b).real.clip(0)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


@pytest.fixture(scope="module")
def digits():
    return digit_reference(8)


def test_digit_quality_separates_real_noise_and_wrong_labels(digits):
    train_x, train_y = digits.train
    real = digit_quality(train_x[:180], train_y[:180], reference=digits)
    noise = digit_quality(np.random.default_rng(0).integers(0, 256, (180, 8, 8, 1), dtype=np.uint8), train_y[:180],
                          reference=digits)
    wrong = digit_quality(train_x[:180], (train_y[:180] + 1) % 10, reference=digits)
    assert real["judge_accuracy"] > 0.9 and real["accuracy"] > 0.9
    assert real["fd"] < 2 * real["fd_floor"]  # real digits sit at the real-vs-real floor
    assert noise["fd"] > 10 * real["fd"] and noise["accuracy"] < 0.3
    assert wrong["accuracy"] < 0.1 and wrong["fd"] == real["fd"]  # labels do not enter the distance
    assert sum(real["class_histogram"]) == 180


def test_bits_per_dim_does_not_depend_on_batching():
    torch.manual_seed(0)
    model = UNetModel(1, 32, 2, 1, (2,), channel_mult=(1, 2), num_classes=10, init="standard").eval()
    diffusion = create_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine")
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    y = torch.arange(5)
    a = bits_per_dim(model, diffusion, x, y, batch_size=5, progress=False)
    b = bits_per_dim(model, diffusion, x, y, batch_size=2, progress=False)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    direct = diffusion.calc_bpd_loop(model, x, model_kwargs={"y": y})["total_bpd"].numpy()
    assert a.shape == (5,) and np.all(a > 0)
    assert np.abs(a - direct).max() < 0.2 * np.abs(direct).max()  # other noise draws, same bound


def small_run(tmp_path_factory, name, seed):
    """A run folder holding one checkpoint of a small digits model initialised from ``seed``."""
    cfg = TrainConfig(diffusion_steps=10, num_res_blocks=1, init="standard", report_to="none")
    torch.manual_seed(seed)
    root = tmp_path_factory.mktemp(name)
    write_checkpoint(root, cfg, UNetModel(**cfg.model_kwargs()))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return small_run(tmp_path_factory, "run", seed=0)


@pytest.fixture(scope="module")
def other_run_dir(tmp_path_factory):
    """The run_dir model with other weights: something to compare it with."""
    return small_run(tmp_path_factory, "other", seed=1)


def mean_of(line):
    return float(line.split(": ")[1].split()[0])


def test_bpd_cli_compares_checkpoints_paired(run_dir, other_run_dir, capsys):
    main(["bpd", "--checkpoint", str(run_dir), "--num_images", "6", "--batch_size", "4"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"bits/dim of {run_dir}: ") and line.endswith("(standard error over 6 held-out images)")
    assert mean_of(line) > 0
    main(["bpd", "--checkpoint", str(run_dir), "--checkpoint", str(other_run_dir), "--checkpoint", str(run_dir),
          "--num_images", "6", "--batch_size", "4"])
    a, b, again, b_minus_a, again_minus_a = capsys.readouterr().out.strip().splitlines()
    assert a == line == again  # the same images and noise every time
    assert b_minus_a.startswith(f"  {other_run_dir} minus {run_dir}: ") and "paired by held-out image" in b_minus_a
    assert mean_of(b_minus_a) == pytest.approx(mean_of(b) - mean_of(a), abs=2e-4)  # printed to 4 decimals
    assert again_minus_a.split(": ")[1].startswith("+0.0000 +- 0.0000")


def test_held_out_losses_are_the_objective_on_seeded_draws():
    cfg = TrainConfig(diffusion_steps=10, num_res_blocks=1, init="standard", report_to="none")
    torch.manual_seed(0)
    model = UNetModel(**cfg.model_kwargs()).eval()
    diffusion = create_diffusion(**cfg.diffusion_kwargs())
    x, y = torch.randn(6, 1, 8, 8).clamp(-1, 1), torch.arange(6)
    got = held_out_losses(model, diffusion, x, y, draws=3, seed=5, batch_size=4)  # two batches per draw
    assert set(got) == {"loss", "mse", "vb"} and all(v.shape == (3,) for v in got.values())
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for d in range(3):  # the same draws, all six images in one batch
            t = torch.randint(0, 10, (6,), generator=gen)
            terms = diffusion.training_losses(model, x, t, {"y": y}, torch.randn(x.shape, generator=gen))
            for k in got:
                # float32 losses summed in another batching: rounding of a few ulps of the largest term
                assert got[k][d] == pytest.approx(terms[k].double().mean().item(), rel=1e-5, abs=1e-7), (k, d)
    np.testing.assert_allclose(got["loss"], got["mse"] + got["vb"], rtol=1e-6)


def test_loss_cli_reports_each_term_paired_by_draw(run_dir, other_run_dir, capsys):
    main(["loss", "--checkpoint", str(run_dir), "--checkpoint", str(other_run_dir), "--num_images", "6",
          "--draws", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(" of ")[0] for ln in lines[::3]] == ["held-out loss", "held-out mse", "held-out vb"]
    assert all(ln.endswith("(standard error over 4 draws)") for ln in lines[::3] + lines[1::3])
    assert all("paired by draw" in ln and ln.startswith(f"  {other_run_dir} minus {run_dir}: ") for ln in lines[2::3])
    loss_a, loss_b = mean_of(lines[0]), mean_of(lines[1])
    assert mean_of(lines[2]) == pytest.approx(loss_b - loss_a, abs=2e-4)
    assert "--draws must be at least 2" in refused(main, ["loss", "--checkpoint", str(run_dir), "--draws", "1"], capsys)


def test_quality_and_benchmark_cli(run_dir, tmp_path, capsys, digits):
    main(["benchmark", "--checkpoint", str(run_dir), "--num_samples", "12", "--runs", "ddpm:full,dpm-solver++:3",
          "--json", str(tmp_path / "rows.json")])
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 4 and table[2].startswith("| ddpm | 10 |") and table[3].startswith("| dpm-solver++ | 3 |")
    train_x, train_y = digits.train
    np.savez(tmp_path / "real.npz", train_x[:50], train_y[:50])
    main(["quality", "--samples", str(tmp_path / "real.npz")])
    out = capsys.readouterr().out
    assert "classifier accuracy on the requested labels: " in out and "real-vs-real floor" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    for argv, message in [(["quality", "--samples", str(tmp_path / "none.npz")], "samples not found"),
                          (["bpd", "--checkpoint", str(tmp_path / "none")], "checkpoint not found"),
                          (["benchmark", "--checkpoint", str(tmp_path), "--runs", "euler:5"], "")]:
        assert message in refused(main, argv, capsys)
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, np.zeros((4, 8, 8, 3), np.uint8))
    assert "use fid for RGB" in refused(main, ["quality", "--samples", str(rgb)], capsys)


def test_fid_explains_itself_when_unavailable(tmp_path, capsys):
    reason = fid_unavailable_reason(weights=str(tmp_path / "missing.pth"))
    if reason is None:
        pytest.skip("torch-fidelity and weights present")
    np.savez(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    err = refused(main, ["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path), "--inception_weights",
                         str(tmp_path / "missing.pth")], capsys)
    assert err == f"error: {reason}" and reason.startswith("Inception FID unavailable: ")


def test_benchmark_sweeps_the_guidance_scale(tmp_path, capsys):
    """Each run at each scale, on the same seeds: the same labels, other images; the rows say
    the scale. (Whether accuracy rises with it is measured on a trained model: docs/sampling.md.)"""
    cfg = TrainConfig(diffusion_steps=10, num_res_blocks=1, init="standard", class_dropout_prob=0.1, report_to="none")
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "run", cfg, UNetModel(**cfg.model_kwargs()))
    main(["benchmark", "--checkpoint", str(tmp_path / "run"), "--num_samples", "12", "--runs", "ddim:3",
          "--guidance", "0,1,3", "--json", str(tmp_path / "rows.json")])
    table = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" | ")[:3] for line in table[2:]] == [["| ddim", "3", w] for w in ("0", "1", "3")]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["guidance_scale"] for r in rows] == [0.0, 1.0, 3.0]
    assert len({r["fd"] for r in rows}) == 3 and all(0 <= r["accuracy"] <= 1 for r in rows)


def test_summarize_seeds_gives_each_cell_its_mean_and_t_interval_over_seeds():
    """Per (sampler, steps, guidance): the mean over seeds and the half-width t_{0.975, n-1} s/sqrt(n)
    (here n = 3: t = 4.302653), the median images/s; one seed gives no interval."""
    rows = [dict(scheduler="ddpm", steps=100, guidance_scale=w, seed=s, images_per_s=ips, fd=fd, fd_floor=1.2,
                 accuracy=acc, confidence=0.9)
            for w, s, ips, fd, acc in [(1.0, 0, 10, 1.0, 0.99), (2.0, 0, 5, 1.4, 1.0), (1.0, 1, 12, 1.2, 0.97),
                                       (2.0, 1, 6, 1.6, 1.0), (1.0, 2, 11, 1.1, 0.98), (2.0, 2, 4, 1.5, 1.0)]]
    one, two = summarize_seeds(rows)
    assert (one["guidance_scale"], one["seeds"], two["guidance_scale"]) == (1.0, [0, 1, 2], 2.0)
    assert one["images_per_s"] == 11 and two["images_per_s"] == 5
    assert one["fd"] == pytest.approx(1.1) and two["fd"] == pytest.approx(1.5)
    # sample sd of (1.0, 1.2, 1.1) is 0.1, of (0.99, 0.97, 0.98) 0.01; accuracy 1.0 thrice has none
    assert one["fd_ci"] == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-6)
    assert one["accuracy_ci"] == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-6) and two["accuracy_ci"] == 0
    assert "| ddpm | 100 | 1 | 11.0 | 1.10 ± 0.25 (1.20) | 0.980 ± 0.025 |" in format_table([one, two])
    single = summarize_seeds(rows[:1])[0]
    assert single["fd"] == 1.0 and single["fd_ci"] != single["fd_ci"]  # NaN: no interval from one seed
    assert "| 1.00 (1.20) | 0.990 | 0.900 |" in format_table([single])


def test_guidance_differences_pair_each_scale_with_w1_of_the_same_seed():
    """The change from W = 1 is taken within a seed (same labels, noise and reference digits), then
    averaged: a shift shared by both rows of a seed cancels, so a small effect under a large
    seed-to-seed spread is resolved. A seed that lacks its W = 1 row is left out."""
    rows = [dict(scheduler="ddim", steps=5, guidance_scale=w, seed=s, fd=base + 0.3 * (w == 2) + 0.01 * s * (w == 2),
                 accuracy=0.9 + 0.05 * (w == 2), fd_floor=1.0, images_per_s=1.0)
            for s, base in enumerate([1.0, 3.0, 0.5]) for w in (1.0, 2.0)]
    rows.append(dict(rows[-1], seed=9))  # a W = 2 row whose seed has no W = 1 row
    (d,) = guidance_differences(rows)
    assert (d["guidance_scale"], d["reference"], d["seeds"]) == (2.0, 1.0, [0, 1, 2])
    assert d["fd"] == pytest.approx(0.31) and d["accuracy"] == pytest.approx(0.05)
    assert d["fd_ci"] == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-6)  # sd of (0.30, 0.31, 0.32)
    assert d["accuracy_ci"] == pytest.approx(0, abs=1e-12)
    assert summarize_seeds(rows[:6])[0]["fd_ci"] > 2  # the unpaired interval: the seed spread swamps 0.31
    assert guidance_differences([r for r in rows if r["guidance_scale"] == 2.0]) == []


def test_summary_reads_saved_rows_and_refuses_other_files(tmp_path, capsys):
    rows = [dict(scheduler="ddpm", steps=10, guidance_scale=w, seed=s, images_per_s=1.0, fd=1.0 + w / 10 + s / 100,
                 fd_floor=1.0, accuracy=0.9, confidence=0.9) for s in (0, 1) for w in (1.0, 3.0)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    main(["summary", "--rows", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out
    assert (
        "| ddpm | 10 | 3 | 1.0 | 1.31 ± 0.06 (1.00) |" in out
        and "| ddpm | 10 | 3 | +0.20 ± 0.00 | +0.000 ± 0.000 | 2 |" in out
    )
    (tmp_path / "bad.json").write_text("{}")
    assert refused(main, ["summary", "--rows", str(tmp_path / "bad.json")], capsys) == \
        f"error: {tmp_path / 'bad.json'}: expected the JSON rows of 'evaluate.py benchmark --json'"
    assert (
        refused(main, ["summary", "--rows", str(tmp_path / "none.json")], capsys)
        == f"error: {tmp_path / 'none.json'}: not found"
    )


def test_benchmark_over_seeds_keeps_every_seed_and_prints_the_summary(run_dir, tmp_path, capsys):
    """--seeds 2: the JSON has each seed's rows (seed 3's are seed 3's alone: the same as a --seed 3
    run), the table one row per run with intervals."""
    main(["benchmark", "--checkpoint", str(run_dir), "--num_samples", "12", "--runs", "ddim:3", "--seed", "2",
          "--seeds", "2", "--json", str(tmp_path / "rows.json")])
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 3 and table[2].startswith("| ddim | 3 | 1 |") and " ± " in table[2]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["seed"] for r in rows] == [2, 3] and rows[0]["fd"] != rows[1]["fd"]
    main(["benchmark", "--checkpoint", str(run_dir), "--num_samples", "12", "--runs", "ddim:3", "--seed", "3",
          "--json", str(tmp_path / "three.json")])
    three = json.loads((tmp_path / "three.json").read_text())[0]
    assert {k: three[k] for k in ("fd", "accuracy", "confidence")} == {
        k: rows[1][k] for k in ("fd", "accuracy", "confidence")
    }


@pytest.mark.parametrize("args,message", [
    (["--guidance", "2"], "was trained without label dropout"),
    (["--guidance", "1,-2"], "--guidance_scale must be a finite number >= 0"),
    (["--guidance", "x"], "--guidance takes numbers"),
    (["--runs", "ddpm:0"], "--steps 0 is out of range"),
    (["--runs", "ddpm:ten"], "steps must be a whole number or 'full'"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--seed", str(2 ** 63 - 1), "--seeds", "2"], "--seeds 2 goes past the largest seed, 2**63 - 1"),
    (["--num_samples", "1"], "needs at least 2 samples"),
    (["--json", "{tmp}"], "is a folder; give a file name"),
    (["--json", "{tmp}/missing/rows.json"], "does not exist"),
])
def test_benchmark_refuses_bad_input_before_sampling(run_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(
        "unet.evaluation.samplers.generate", lambda *a, **k: pytest.fail("sampled before checking the input")
    )
    argv = ["benchmark", "--checkpoint", str(run_dir), "--runs", "ddim:3", *[a.format(tmp=tmp_path) for a in args]]
    assert message in refused(main, argv, capsys)


def test_quality_of_one_sample_is_refused(tmp_path, capsys, digits):
    train_x, train_y = digits.train
    np.savez(tmp_path / "one.npz", train_x[:1], train_y[:1])
    message = refused(main, ["quality", "--samples", str(tmp_path / "one.npz"), "--json"], capsys)
    assert message == "error: digit quality needs at least 2 samples (the Frechet distance fits a covariance), got 1"
    np.savez(tmp_path / "two.npz", train_x[:2], train_y[:2])
    main(["quality", "--samples", str(tmp_path / "two.npz"), "--json"])
    assert json.loads(capsys.readouterr().out)["n"] == 2
