"""improved-diffusion's --use_kl through the training loop: the logged loss is L_vlb times T,
whatever rescale_learned_sigmas says (issue 13)."""

import pytest

from unet.config import TrainConfig
from unet.train.loop import train

T = 20


def first_step(out, **kw):
    """The first step's record of a one-step run: 8x8 digits, a one-block U-Net, T diffusion steps.
    No dropout, so runs differing only in the objective see the same weights, batch, t and noise."""
    cfg = TrainConfig(output_dir=str(out), max_steps=1, batch_size=8, num_res_blocks=1, diffusion_steps=T,
                      report_to="none", progress=False, checkpoint_every=1, keep_checkpoints=1, log_every=1,
                      diagnostics_every=0, eval_every=0, sample_every=-1, warmup_steps=1, dropout=0.0,
                      learn_sigma=True, **kw)
    return train(cfg)["history"][0]


def test_use_kl_logs_t_times_the_vlb(tmp_path):
    # Unrescaled L_hybrid reports the batch's VLB term as `vb` (the mean detached only for the
    # gradient, so its value is the VLB of the same output).
    hybrid = first_step(tmp_path / "hybrid", use_kl=False, rescale_learned_sigmas=False)
    kl = first_step(tmp_path / "kl", use_kl=True, rescale_learned_sigmas=False)
    kl_rescaled = first_step(tmp_path / "kl_rescaled", use_kl=True, rescale_learned_sigmas=True)
    assert set(kl) >= {"loss"} and "vb" not in kl and "mse" not in kl
    # the same float32 per-sample terms, scaled before or after the batch mean: float32 rounding only
    assert kl["loss"] == pytest.approx(T * hybrid["vb"], rel=1e-5)
    assert kl_rescaled["loss"] == kl["loss"]
