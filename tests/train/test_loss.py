"""sd_loha.train.loss against hand computations: min-SNR-γ weights (ε and v), kohya's debiased estimation and
v-prediction-like weights, Huber / smooth-L1 with kohya's per-timestep threshold (huber_schedule), targets; and
the Huber and weighting options reaching the trainer's loss."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import DDPMScheduler

from sd_loha.train import train
from sd_loha.train.loss import (
    LossWeighting,
    diffusion_loss,
    huber_threshold,
    loss_weights,
    min_snr_weights,
    per_sample_loss,
    snr,
    target_for,
)

from . import kohya_reference as kohya
from .helpers import base_config


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
    kohya_w = _kohya_post_processed(sched, t, prediction_type, LossWeighting(min_snr_gamma=gamma))
    torch.testing.assert_close(got, kohya_w, rtol=1e-5, atol=0)
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
    got = diffusion_loss(eps, pred, latents, noise, t, weighting=LossWeighting(min_snr_gamma=5.0))
    assert float(got) == pytest.approx(float((per * w).mean()), rel=1e-4)
    assert float(diffusion_loss(eps, pred, latents, noise, t)) == pytest.approx(float(per.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        target_for(_scheduler("sample"), latents, noise, t)


def _pseudo_huber(d: float, c: float, loss_type: str) -> float:
    """2c(sqrt(d² + c²) - c) for huber; the same without the leading c for smooth_l1."""
    return (2 * c if loss_type == "huber" else 2.0) * (math.sqrt(d * d + c * c) - c)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_huber_threshold_per_schedule(scale):
    sched, c = _scheduler("epsilon"), 0.1
    t = torch.tensor(TIMESTEPS)
    got = {s: huber_threshold(sched, t, huber_c=c, schedule=s, huber_scale=scale).tolist()
           for s in ("snr", "exponential", "constant")}
    for i, step in enumerate(TIMESTEPS):
        ab = _alpha_bar(step)
        sigma = math.sqrt((1 - ab) / ab)
        # kohya sd-scripts: snr (1 - c)/(1 + σ)² + c, without huber_scale; exponential exp(-(-ln c / T) t) = c^(t/T)
        # times huber_scale; constant c times huber_scale
        assert got["snr"][i] == pytest.approx((1 - c) / (1 + sigma) ** 2 + c, rel=1e-4)
        assert got["exponential"][i] == pytest.approx(c ** (step / 1000) * scale, rel=1e-5)
        assert got["constant"][i] == pytest.approx(c * scale, rel=1e-6)
    # snr: almost 1 (≈ L2 for latent-sized errors) at t = 0, almost c at t = 999
    assert got["snr"][0] > 0.9 and got["snr"][-1] < 0.11
    with pytest.raises(ValueError, match="unknown huber_schedule 'linear'"):
        huber_threshold(sched, t, huber_c=c, schedule="linear")


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_per_sample_threshold_in_the_loss(loss_type):
    pred = torch.tensor([[0.5, -2.0], [0.5, -2.0], [3.0, 0.0]])
    target = torch.zeros(3, 2)
    cs = [0.05, 1.0, 0.3]
    got = per_sample_loss(pred, target, loss_type, torch.tensor(cs))
    for row, c in enumerate(cs):
        want = sum(_pseudo_huber(d, c, loss_type) for d in pred[row].tolist()) / 2
        assert float(got[row]) == pytest.approx(want, rel=1e-6)
    assert float(got[0]) != pytest.approx(float(got[1]))  # same errors, another c: another loss


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_huber_schedule_and_min_snr_by_hand(prediction_type):
    sched = _scheduler(prediction_type)
    gen = torch.Generator().manual_seed(1)
    latents, noise, pred = (torch.randn(3, 4, 2, 2, generator=gen) for _ in range(3))
    t = torch.tensor([20, 500, 950])
    target = target_for(sched, latents, noise, t)
    c0, gamma = 0.1, 5.0
    values = {}
    for schedule in ("snr", "exponential", "constant"):
        got = float(diffusion_loss(sched, pred, latents, noise, t, loss_type="huber", huber_c=c0,
                                   huber_schedule=schedule, weighting=LossWeighting(min_snr_gamma=gamma)))
        want = 0.0
        for i, step in enumerate(t.tolist()):
            ab = _alpha_bar(step)
            s, sigma = ab / (1 - ab), math.sqrt((1 - ab) / ab)
            c = {"snr": (1 - c0) / (1 + sigma) ** 2 + c0, "exponential": c0 ** (step / 1000), "constant": c0}[schedule]
            w = min(s, gamma) / (s + 1 if prediction_type == "v_prediction" else s)
            diffs = (pred[i] - target[i]).flatten().tolist()
            want += w * sum(_pseudo_huber(d, c, "huber") for d in diffs) / len(diffs)
        assert got == pytest.approx(want / 3, rel=1e-4), schedule
        values[schedule] = got
    assert len({round(v, 6) for v in values.values()}) == 3  # the schedule changes the loss
    # the call without huber_schedule gets kohya's default, snr
    assert float(diffusion_loss(sched, pred, latents, noise, t, loss_type="huber", huber_c=c0,
                                weighting=LossWeighting(min_snr_gamma=gamma))) == pytest.approx(values["snr"], rel=1e-6)


def test_loss_weights():
    sched = _scheduler("epsilon")
    t = torch.tensor(TIMESTEPS)
    assert torch.equal(loss_weights(sched, t), torch.ones(len(TIMESTEPS)))
    assert torch.equal(loss_weights(sched, t, LossWeighting()), torch.ones(len(TIMESTEPS)))
    torch.testing.assert_close(loss_weights(sched, t, LossWeighting(min_snr_gamma=5.0)), min_snr_weights(sched, t, 5.0))


def _kohya_weight(step: int, prediction_type: str, *, gamma: float | None = None, debiased: bool = False,
                  scale_v: bool = False, v_like: float | None = None) -> float:
    """kohya's post_process_loss on a loss of 1, in its order: apply_snr_weight (uncapped SNR),
    scale_v_prediction_loss_like_noise_prediction and add_v_prediction_like_loss (get_snr_scale: SNR capped at
    1000, scale = SNR/(SNR+1)), apply_debiased_estimation (capped SNR: 1/sqrt(SNR) for ε, 1/(SNR+1) for v)."""
    ab = _alpha_bar(step)
    snr_t = ab / (1 - ab)
    capped = min(snr_t, 1000.0)
    v = prediction_type == "v_prediction"
    loss = 1.0
    if gamma:
        loss *= min(snr_t, gamma) / (snr_t + 1 if v else snr_t)
    if scale_v:
        loss *= capped / (capped + 1)
    if v_like:
        loss = loss + loss / (capped / (capped + 1)) * v_like
    if debiased:
        loss *= 1 / (capped + 1) if v else 1 / math.sqrt(capped)
    return loss


WEIGHTINGS = [
    ("epsilon", dict(debiased=True)),
    ("v_prediction", dict(debiased=True)),
    ("v_prediction", dict(scale_v=True)),
    ("epsilon", dict(v_like=0.1)),
    ("epsilon", dict(gamma=5.0, debiased=True, v_like=0.3)),
    ("v_prediction", dict(gamma=1.0, scale_v=True, debiased=True)),
]


@pytest.mark.parametrize("prediction_type, kw", WEIGHTINGS)
def test_weighting_schemes_match_kohya(prediction_type, kw):
    sched = _scheduler(prediction_type)
    t = torch.tensor(TIMESTEPS)
    weighting = LossWeighting(min_snr_gamma=kw.get("gamma"), debiased_estimation_loss=kw.get("debiased", False),
                              scale_v_pred_loss_like_noise_pred=kw.get("scale_v", False),
                              v_pred_like_loss=kw.get("v_like"))
    got = loss_weights(sched, t, weighting)
    for i, step in enumerate(TIMESTEPS):
        assert float(got[i]) == pytest.approx(_kohya_weight(step, prediction_type, **kw), rel=1e-4), step
    torch.testing.assert_close(got, _kohya_post_processed(sched, t, prediction_type, weighting), rtol=1e-5, atol=0)


def _kohya_post_processed(sched, t: torch.Tensor, prediction_type: str, weighting: LossWeighting) -> torch.Tensor:
    """kohya's post_process_loss on a per-sample loss of 1: the weights in its arithmetic (fp32, SNR as
    (sqrt(ᾱ)/sqrt(1 - ᾱ))² from the scheduler's ᾱ)."""
    options = kohya.Options(v_parameterization=prediction_type == "v_prediction", **dataclasses.asdict(weighting))
    return kohya.weighted(torch.ones(len(t)), options, sched, t)


def test_snr_cap_of_kohya():
    """SNR(t = 0) on SD's schedule is about 1175; kohya's debiased weight uses 1000 there, min-SNR does not."""
    sched = _scheduler("epsilon")
    t0 = torch.tensor([0])
    assert float(snr(sched, t0)) == pytest.approx(_alpha_bar(0) / (1 - _alpha_bar(0)), rel=1e-4) and float(snr(sched, t0)) > 1000
    debiased = float(loss_weights(sched, t0, LossWeighting(debiased_estimation_loss=True)))
    assert debiased == pytest.approx(1 / math.sqrt(1000), rel=1e-6)


def test_weighting_from_config(tmp_path):
    from sd_loha.train.config import config_from_kwargs

    cfg = config_from_kwargs(**base_config(tmp_path, min_snr_gamma=5.0, debiased_estimation_loss=True,
                                           v_pred_like_loss=0.2))
    assert LossWeighting.from_config(cfg) == LossWeighting(min_snr_gamma=5.0, debiased_estimation_loss=True,
                                                           v_pred_like_loss=0.2)


def test_huber_options_reach_the_trainer_loss(tmp_path):
    def first_loss(name: str, **overrides) -> float:
        cfg = base_config(tmp_path / name, max_train_steps=1, train_text_encoder=False, loss_type="huber", **overrides)
        return train(cfg, progress=False).losses[0]

    # same seed, so the same batch, noise and timesteps: only c differs
    snr_loss = first_loss("snr", huber_schedule="snr")
    constant = first_loss("constant", huber_schedule="constant")
    scaled = first_loss("scaled", huber_schedule="constant", huber_scale=3.0)
    assert snr_loss == pytest.approx(first_loss("default"), rel=1e-6)  # snr is the default
    assert len({round(v, 7) for v in (snr_loss, constant, scaled)}) == 3


def _one_loss_step(tmp_path, seed: int, **overrides):
    """(trainer, its first batch, loss_step's loss for a generator seeded with `seed`, the UNet's prediction)."""
    from sd_loha.train.config import config_from_kwargs
    from sd_loha.train.loop import Trainer

    out = tmp_path / "out"
    t = Trainer(config_from_kwargs(**base_config(out, train_text_encoder=False, **overrides)), out, progress=False)
    t.setup()
    batch = next(iter(t.loader))
    preds = []
    t.unet.register_forward_hook(lambda m, args, output: preds.append(output.sample.detach().float()))
    loss = float(t.loss_step(batch, torch.Generator().manual_seed(seed)).detach())
    return t, batch, loss, preds[0]


@pytest.mark.parametrize("loss_type, schedule", [("l2", "snr"), ("huber", "constant"), ("huber", "snr"),
                                                 ("smooth_l1", "exponential")])
def test_trainer_loss_step_is_the_formula_of_loss_type_and_huber_c(tmp_path, loss_type, schedule):
    """The trainer's own loss for one batch equals the textbook formula for loss_type with huber_c = 0.3 (per-sample
    c from the schedule), recomputed here from the UNet's prediction and the same noise and timesteps."""
    t, batch, loss, pred = _one_loss_step(tmp_path, 5, loss_type=loss_type, huber_c=0.3, huber_schedule=schedule)

    gen = torch.Generator().manual_seed(5)  # loss_step draws the noise, then the timesteps
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=gen)
    steps = torch.randint(0, t.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    d2 = (pred - noise) ** 2
    abar = t.noise_scheduler.alphas_cumprod[steps].double()
    c = {"constant": torch.full_like(abar, 0.3),
         "snr": (1 - 0.3) / (1 + ((1 - abar) / abar).sqrt()) ** 2 + 0.3,
         "exponential": 0.3 ** (steps.double() / t.noise_scheduler.config.num_train_timesteps)}[schedule]
    c = c.float().view(-1, 1, 1, 1)
    elem = {"l2": d2, "huber": 2 * c * ((d2 + c**2).sqrt() - c), "smooth_l1": 2 * ((d2 + c**2).sqrt() - c)}[loss_type]
    assert loss == pytest.approx(float(elem.mean(dim=(1, 2, 3)).mean()), rel=1e-5)
    # kohya's train_network: conditional_loss(reduction="none") with its per-timestep threshold, mean per sample
    options = kohya.Options(loss_type=loss_type, huber_schedule=schedule, huber_c=0.3)
    theirs = kohya.per_sample_loss(pred, noise, options, t.noise_scheduler, steps)
    assert loss == pytest.approx(float(theirs.mean()), rel=1e-5)


@pytest.mark.parametrize("model, options, v", [
    ("tiny-sd1", dict(debiased_estimation_loss=True, v_pred_like_loss=0.25, min_snr_gamma=5.0), False),
    ("tiny-sd2", dict(debiased_estimation_loss=True, scale_v_pred_loss_like_noise_pred=True), True),
])
def test_trainer_loss_is_weighted_like_kohya(tmp_path, model, options, v):
    """The trainer's loss for one batch equals the textbook per-sample MSE times kohya's weights, recomputed from
    the UNet's prediction and the same noise and timesteps (loss_step draws the noise, then the timesteps)."""
    t, batch, loss, pred = _one_loss_step(tmp_path, 5, pretrained_model=model, train_batch_size=4, **options)

    gen = torch.Generator().manual_seed(5)
    x0 = batch["latents"].float()
    noise = torch.randn(x0.shape, generator=gen)
    steps = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    ab = t.noise_scheduler.alphas_cumprod[steps].view(-1, 1, 1, 1)
    target = ab.sqrt() * noise - (1 - ab).sqrt() * x0 if v else noise
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    w = torch.tensor([_kohya_weight(int(s), "v_prediction" if v else "epsilon", gamma=options.get("min_snr_gamma"),
                                    debiased=options.get("debiased_estimation_loss", False),
                                    scale_v=options.get("scale_v_pred_loss_like_noise_pred", False),
                                    v_like=options.get("v_pred_like_loss")) for s in steps])
    assert loss == pytest.approx(float((per * w).mean()), rel=1e-4)
    kohya_w = _kohya_post_processed(t.noise_scheduler, steps, "v_prediction" if v else "epsilon",
                                    LossWeighting.from_config(t.cfg))
    assert loss == pytest.approx(float((per * kohya_w).mean()), rel=1e-5)
    assert loss != pytest.approx(float(per.mean()), rel=1e-2)


def test_train_uses_the_weighting_options(tmp_path, monkeypatch):
    """Through train(), each step's loss is weighted by kohya's weights for its timesteps (min-SNR, debiased,
    v-prediction-like together): the weights diffusion_loss used, watched on the real loss_weights, equal
    kohya's post_process_loss on a loss of 1."""
    import sd_loha.train.loss as loss_mod

    used = []
    real = loss_mod.loss_weights

    def spy(scheduler, timesteps, weighting=None):  # the real function, watched
        w = real(scheduler, timesteps, weighting)
        used.append((scheduler, timesteps, weighting, w))
        return w

    monkeypatch.setattr(loss_mod, "loss_weights", spy)
    run = train(base_config(tmp_path / "w", max_train_steps=2, train_text_encoder=False, min_snr_gamma=5.0,
                            debiased_estimation_loss=True, v_pred_like_loss=0.1), progress=False)
    assert run.steps == 2 and len(used) == 2
    for scheduler, steps, weighting, w in used:
        assert weighting == LossWeighting(min_snr_gamma=5.0, debiased_estimation_loss=True, v_pred_like_loss=0.1)
        torch.testing.assert_close(w, _kohya_post_processed(scheduler, steps, "epsilon", weighting), rtol=1e-5, atol=0)
        assert (w != 1).all()
