"""Classifier-free guidance training (label dropout to a null class) and improved-diffusion's
constant-rate EMA: what the model sees, what the EMA holds, and the config's checks."""

import pytest
import torch

from unet.config import ConfigError, TrainConfig
from unet.core.resample import UniformSampler
from unet.data.dataset import draw_step_inputs, seeded_generator
from unet.train.loop import make_ema, train

SHAPE = (64, 1, 8, 8)


def tiny(out, **kw):
    base = dict(output_dir=str(out), max_steps=3, batch_size=16, num_res_blocks=1, diffusion_steps=20,
                report_to="none", progress=False, checkpoint_every=0, log_every=1, diagnostics_every=0,
                eval_every=0, sample_every=-1, warmup_steps=0)
    return TrainConfig(**{**base, **kw})


def test_drop_mask_leaves_the_other_draws_unchanged_and_has_the_asked_rate():
    sampler = UniformSampler(20)
    plain = draw_step_inputs(sampler, seeded_generator(0, 5), SHAPE, True)
    dropped = draw_step_inputs(sampler, seeded_generator(0, 5), SHAPE, True, 0.25)
    for a, b in zip(plain[:4], dropped[:4]):  # t, w, noise, flip: the same numbers as without dropout
        assert torch.equal(a, b)
    assert not plain[4].any()
    again = draw_step_inputs(sampler, seeded_generator(0, 5), SHAPE, True, 0.25)
    assert torch.equal(dropped[4], again[4])  # a pure function of (seed, step): the same after resume
    # Over 200 steps of 64 labels: 12,800 Bernoulli(0.25) draws, sd 0.0038; 5 sd either side.
    rate = torch.cat([draw_step_inputs(sampler, seeded_generator(0, s), SHAPE, False, 0.25)[4]
                      for s in range(200)]).float().mean().item()
    assert abs(rate - 0.25) < 5 * (0.25 * 0.75 / 12_800) ** 0.5


def test_training_feeds_the_null_label_where_the_mask_says(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, class_dropout_prob=0.3)
    assert cfg.model_kwargs()["num_classes"] == cfg.num_classes + 1
    seen = []
    real_forward = torch.nn.Embedding.forward

    def record(self, y):
        if self.num_embeddings == cfg.num_classes + 1 and len(y) == cfg.batch_size:  # training batches only
            seen.append(y.detach().clone())
        return real_forward(self, y)

    monkeypatch.setattr(torch.nn.Embedding, "forward", record)
    train(cfg)
    assert len(seen) == cfg.max_steps
    sampler = UniformSampler(20)
    for step, y in enumerate(seen):
        drop = draw_step_inputs(sampler, seeded_generator(cfg.seed, step), (cfg.batch_size, 1, 8, 8), False, 0.3)[4]
        assert torch.equal(y == cfg.num_classes, drop)
        assert (y[~drop] < cfg.num_classes).all()


def test_constant_rate_ema_is_improved_diffusions():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = make_ema([p], 0.9, warmup=False)
    values = []
    for k in range(1, 4):
        with torch.no_grad():
            p.fill_(float(k))
        ema.step([p])
        values.append(ema.shadow_params[0][0].item())
    # e_k = 0.9 e_{k-1} + 0.1 k from e_0 = 0 (the initial weights): 0.1, 0.29, 0.561
    assert values == pytest.approx([0.1, 0.29, 0.561], abs=1e-6)
    warm = make_ema([torch.nn.Parameter(torch.zeros(3))], 0.9, warmup=True)
    assert warm.get_decay(1) == 0.0 and warm.get_decay(5) == pytest.approx(5 / 14)


@pytest.mark.parametrize("kw, key", [
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (dict(class_dropout_prob=-0.1), "class_dropout_prob"),
    (dict(class_dropout_prob=float("nan")), "class_dropout_prob"),
    (dict(class_dropout_prob=0.1, class_cond=False), "class_dropout_prob"),
])
def test_bad_label_dropout_is_one_line(kw, key):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)
