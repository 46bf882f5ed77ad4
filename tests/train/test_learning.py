"""The trainer learns: a short run on the demo images lowers the plain denoising loss of the base model by a
clear margin on the training images, and also on held-out images of the same style."""

from __future__ import annotations

import pytest

from sd_loha import apply_loha
from sd_loha.models import build_tiny_pipeline
from sd_loha.train.loop import train

from .helpers import DEMO_IMAGES, HELDOUT_IMAGES, base_config, denoising_loss

STEPS = 150
MIN_GAIN = 0.25  # the adapter must cut the training images' loss by at least a quarter


@pytest.mark.slow
def test_adapter_lowers_denoising_loss_on_training_and_heldout_images(tmp_path):
    cfg = base_config(tmp_path / "out", max_train_steps=STEPS, train_batch_size=2, learning_rate=2e-3,
                      preset="attn-mlp", network_dim=8, network_alpha=4.0, train_text_encoder=True, flip_aug=True)
    result = train(cfg, progress=False)
    assert result.steps == STEPS

    pipe = build_tiny_pipeline("tiny-sd1")
    base_train, base_heldout = denoising_loss(pipe, DEMO_IMAGES), denoising_loss(pipe, HELDOUT_IMAGES)
    report = apply_loha(pipe, result.output, strict=True)
    assert report.patched["te"] > 0
    tuned_train, tuned_heldout = denoising_loss(pipe, DEMO_IMAGES), denoising_loss(pipe, HELDOUT_IMAGES)
    print(f"denoising loss, training images: base {base_train:.4f} -> adapter {tuned_train:.4f} "
          f"({1 - tuned_train / base_train:.1%} lower); held-out: base {base_heldout:.4f} -> adapter {tuned_heldout:.4f} "
          f"({1 - tuned_heldout / base_heldout:.1%} lower)")
    assert tuned_train <= (1 - MIN_GAIN) * base_train
    assert tuned_heldout < base_heldout
    # the run's own loss curve fell too (min-SNR off here, so it is the same objective)
    first, last = sum(result.losses[:15]) / 15, sum(result.losses[-15:]) / 15
    assert last < 0.75 * first
