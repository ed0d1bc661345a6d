"""The U-Net and diffusion against numbers computed by openai/improved-diffusion (commit
1bc7bbb) on a small random-weight model: see tests/fixtures/README.md."""

import json
from pathlib import Path

import pytest
import torch

from unet.core.diffusion import create_diffusion
from unet.core.model import UNetModel

FIXTURE = Path(__file__).parent / "fixtures" / "iddpm_reference.pt"


@pytest.fixture(scope="module")
def ref():
    d = torch.load(FIXTURE, weights_only=True)
    case = json.loads(d["case"])
    model = UNetModel(**case["model"])
    model.load_state_dict(d["state_dict"], strict=True)
    model.eval()
    return dict(case=case, model=model, inputs=d["inputs"], expected=d["expected"],
                diffusion=create_diffusion(**case["diffusion"]),
                respaced=create_diffusion(**{**case["diffusion"], "timestep_respacing": case["respacing"]}))


def rel_err(ours, theirs):
    """Largest absolute difference over the reference's largest absolute value."""
    return ((ours.float() - theirs).abs().max() / theirs.abs().max()).item()


def test_state_dict_keys_are_the_originals(ref):
    ours = set(ref["model"].state_dict())
    theirs = set(torch.load(FIXTURE, weights_only=True)["state_dict"])
    assert ours == theirs


def test_model_output(ref):
    i = ref["inputs"]
    with torch.no_grad():
        out = ref["model"](i["x_start"], ref["diffusion"].model_timesteps(i["t"]), y=i["y"])
    assert rel_err(out, ref["expected"]["model_out"]) < 1e-5


def test_betas_and_q_sample(ref):
    e, i, d = ref["expected"], ref["inputs"], ref["diffusion"]
    assert rel_err(torch.from_numpy(d.betas), e["betas"]) < 1e-6
    assert rel_err(d.q_sample(i["x_start"], i["t"], i["noise"]), e["x_t"]) < 1e-6


def test_training_losses_hybrid(ref):
    e, i = ref["expected"], ref["inputs"]
    with torch.no_grad():
        terms = ref["diffusion"].training_losses(ref["model"], i["x_start"], i["t"], {"y": i["y"]}, i["noise"])
    for k in ("loss", "mse", "vb"):
        assert rel_err(terms[k], e[f"loss_{k}"]) < 1e-5, k
    # The last sample sits at t = T-1, where vb is ~149 bits: checked relatively on its own.
    assert e["loss_vb"][3] > 100
    assert abs(terms["vb"][3].item() / e["loss_vb"][3].item() - 1) < 1e-5


# pred_xstart = x_t / sqrt(abar) - sqrt(1/abar - 1) * eps: the float32 rounding of the model's
# eps (~8e-6 absolute, conv summation order) is multiplied by sqrt(1/abar - 1), 1.04 and 1.22 at
# the mid steps, so x_0 gets a slightly wider bound than the other terms.
TOLERANCE = {"mean": 1e-5, "variance": 1e-5, "log_variance": 1e-5, "pred_xstart": 1.5e-5}


@pytest.mark.parametrize("respaced", [False, True])
def test_p_mean_variance(ref, respaced):
    e, i = ref["expected"], ref["inputs"]
    prefix = "respaced_pmv_" if respaced else "pmv_"
    diffusion = ref["respaced" if respaced else "diffusion"]
    x_t, t = (e["respaced_x_t"], e["respaced_t"]) if respaced else (e["x_t"], i["t"])
    with torch.no_grad():
        out = diffusion.p_mean_variance(ref["model"], x_t, t, clip_denoised=True, model_kwargs={"y": i["y"]})
    for k, tol in TOLERANCE.items():
        assert rel_err(out[k], e[prefix + k]) < tol, (k, rel_err(out[k], e[prefix + k]))


def test_respaced_process(ref):
    e, i, r = ref["expected"], ref["inputs"], ref["respaced"]
    assert r.timestep_map.tolist() == e["respaced_timestep_map"].tolist()
    assert rel_err(torch.from_numpy(r.betas), e["respaced_betas"]) < 1e-6
    assert rel_err(r.q_sample(i["x_start"], e["respaced_t"], i["noise"]), e["respaced_x_t"]) < 1e-6


def test_bits_per_dim(ref):
    """The prior term is exact; the looped terms draw their own noise, so they are compared
    statistically: the original's total over 8 of our noise draws, per image."""
    e, i, d = ref["expected"], ref["inputs"], ref["diffusion"]
    runs = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(8):
            runs.append(d.calc_bpd_loop(ref["model"], i["x_start"], True, {"y": i["y"]},
                                        noise_fn=lambda step: torch.randn(i["x_start"].shape, generator=gen)))
    assert (runs[0]["prior_bpd"] - e["bpd_prior_bpd"]).abs().max() < 1e-6
    total = torch.stack([r["total_bpd"] for r in runs])
    z = (e["bpd_total_bpd"] - total.mean(0)) / total.std(0)
    assert z.abs().max() < 4, f"original total bpd {e['bpd_total_bpd']} vs ours {total.mean(0)} +- {total.std(0)}"
    # Term by term, averaged over the four images: the per-step means agree within their spread.
    for k in ("vb", "mse", "xstart_mse"):
        ours = torch.stack([r[k] for r in runs]).mean(dim=(0, 1))
        theirs = e[f"bpd_{k}"].mean(0)
        assert ours.shape == theirs.shape == (d.num_timesteps,)
        assert (ours.sum() / theirs.sum() - 1).abs() < 0.03, (k, ours.sum(), theirs.sum())
    # and the loop's column order: column i is step T-1-i, whose vb grows towards t = 0.
    assert e["bpd_vb"][:, -1].mean() > e["bpd_vb"][:, 0].mean()
