"""sd_loha.train.loss against hand computations: min-SNR-γ weights (ε and v), Huber / smooth-L1, targets."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sd_loha.train.loss import diffusion_loss, min_snr_weights, per_sample_loss, snr, target_for


def _scheduler(prediction_type: str) -> DDPMScheduler:
    # SD's schedule: scaled_linear betas 0.00085 .. 0.012 over 1000 steps
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def _alpha_bar(t: int) -> float:
    """ᾱ_t by hand: β_i = (sqrt(0.00085) + i/999 (sqrt(0.012) - sqrt(0.00085)))², ᾱ_t = Π_{i<=t} (1 - β_i)."""
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    for i in range(t + 1):
        prod *= 1.0 - (a + i / 999 * (b - a)) ** 2
    return prod


TIMESTEPS = [0, 10, 100, 400, 999]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_the_formula(prediction_type, gamma):
    sched = _scheduler(prediction_type)
    t = torch.tensor(TIMESTEPS)
    got = min_snr_weights(sched, t, gamma)
    for i, step in enumerate(TIMESTEPS):
        ab = _alpha_bar(step)
        s = ab / (1 - ab)
        # Hang et al. 2023: ε-prediction min(SNR, γ)/SNR; v-prediction min(SNR, γ)/(SNR + 1)
        want = min(s, gamma) / (s + 1 if prediction_type == "v_prediction" else s)
        assert float(snr(sched, t[i : i + 1])) == pytest.approx(s, rel=1e-4)
        assert float(got[i]) == pytest.approx(want, rel=1e-4), (step, float(got[i]), want)
    # low noise (high SNR) is down-weighted, high noise is not, for ε
    if prediction_type == "epsilon":
        assert float(got[0]) < 0.01 and float(got[-1]) == pytest.approx(1.0)


def test_huber_and_smooth_l1_match_the_formula():
    pred = torch.tensor([[0.0, 0.5, -2.0, 0.05], [1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 3.0, 0.9]])
    c = 0.1
    for loss_type, scale in (("huber", 2 * c), ("smooth_l1", 2.0)):
        got = per_sample_loss(pred, target, loss_type, huber_c=c)
        for row in range(2):
            elems = [scale * (math.sqrt((p - q) ** 2 + c * c) - c) for p, q in zip(pred[row].tolist(), target[row].tolist())]
            assert float(got[row]) == pytest.approx(sum(elems) / len(elems), rel=1e-6)
    # Huber is quadratic near 0 (≈ d²) and linear far out (≈ 2c|d|)
    small, large = torch.tensor([[1e-3]]), torch.tensor([[100.0]])
    assert float(per_sample_loss(small, torch.zeros(1, 1), "huber", c)) == pytest.approx(1e-6, rel=1e-3)
    assert float(per_sample_loss(large, torch.zeros(1, 1), "huber", c)) == pytest.approx(2 * c * 100 - 2 * c * c, rel=1e-3)
    l2 = per_sample_loss(pred, target, "l2")
    assert l2.tolist() == pytest.approx([(0 + 0.25 + 4 + 0.0025) / 4, (0 + 1 + 4 + 0.01) / 4])
    with pytest.raises(ValueError, match="unknown loss_type"):
        per_sample_loss(pred, target, "l3")


def test_targets_and_weighted_loss():
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([5, 500, 990])
    eps, v = _scheduler("epsilon"), _scheduler("v_prediction")
    assert torch.equal(target_for(eps, latents, noise, t), noise)
    ab = torch.tensor([_alpha_bar(int(s)) for s in t]).view(3, 1, 1, 1)
    torch.testing.assert_close(target_for(v, latents, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * latents,
                               rtol=1e-4, atol=1e-5)
    pred = torch.randn(3, 4, 2, 2, generator=gen)
    per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    w = torch.tensor([min(s, 5.0) / s for s in (ab / (1 - ab)).flatten().tolist()])
    assert float(diffusion_loss(eps, pred, latents, noise, t, min_snr_gamma=5.0)) == pytest.approx(float((per * w).mean()), rel=1e-4)
    assert float(diffusion_loss(eps, pred, latents, noise, t)) == pytest.approx(float(per.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        target_for(_scheduler("sample"), latents, noise, t)
