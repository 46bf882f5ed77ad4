"""The kohya `ss_*` and `modelspec.*` metadata a trained adapter file carries (see docs/format.md).

A1111's adapter card, Civitai and kohya's tools read these keys; the LoHA-specific ones (network module,
dims, args) come from the network itself (`LoHANetwork.metadata`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .lowmem import base_storage


def sd3_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """kohya's SD 3.x keys (sd3_train_network.py update_metadata): its CLIP / T5 attention masks, which sd-loha does
    not apply (StableDiffusion3Pipeline does not either), and the timestep draw."""
    return {"ss_apply_lg_attn_mask": False, "ss_apply_t5_attn_mask": False,
            "ss_weighting_scheme": cfg.weighting_scheme, "ss_logit_mean": cfg.logit_mean,
            "ss_logit_std": cfg.logit_std, "ss_mode_scale": cfg.mode_scale}


def training_metadata(cfg: TrainConfig, preflight, *, step: int, epoch: int, started: float,
                      num_processes: int, sd3: bool = False) -> dict[str, Any]:
    """The run's ss_* / modelspec.* keys; ``sd3``: an SD 3.x run, which adds kohya's SD 3.x keys."""
    tags: dict[str, Counter] = {}
    dirs: dict[str, dict[str, int]] = {}
    for it in preflight.items:
        d = it.subset_dir.name
        dirs.setdefault(d, {"n_repeats": it.repeats, "img_count": 0})["img_count"] += 1
        for tag in (it.caption or "").split(","):
            if tag.strip():
                tags.setdefault(d, Counter())[tag.strip()] += 1
    w, h = cfg.resolution
    return {
        "ss_output_name": cfg.output_name,
        "ss_sd_model_name": Path(cfg.pretrained_model).name if os.path.exists(cfg.pretrained_model) else cfg.pretrained_model,
        "ss_resolution": f"({w}, {h})",
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.effective_unet_lr,
        "ss_text_encoder_lr": cfg.effective_text_encoder_lr if cfg.train_text_encoder else 0.0,
        "ss_optimizer": cfg.optimizer_type,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_num_train_images": sum(it.repeats for it in preflight.items),
        "ss_num_reg_images": sum(it.repeats for it in preflight.reg_items),
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_num_batches_per_epoch": preflight.steps_per_epoch,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * num_processes * cfg.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_fp8_base": base_storage(cfg.fp8_base, cfg.base_weight_dtype) == "fp8",  # kohya's key
        "ss_base_weight_dtype": base_storage(cfg.fp8_base, cfg.base_weight_dtype),
        "ss_seed": cfg.seed,
        "ss_clip_skip": cfg.clip_skip,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_noise_offset": cfg.noise_offset or None,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule if cfg.loss_type != "l2" else None,
        "ss_huber_c": cfg.huber_c if cfg.loss_type != "l2" else None,
        "ss_huber_scale": cfg.huber_scale if cfg.loss_type != "l2" else None,
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_max_train_steps": cfg.max_train_steps,
        "ss_training_started_at": started,
        "ss_training_finished_at": time.time(),
        "ss_tag_frequency": {k: dict(v) for k, v in tags.items()},
        "ss_dataset_dirs": dirs,
        "ss_bucket_info": {"buckets": {str(i): {"resolution": list(b.bucket), "count": b.samples}
                                       for i, b in enumerate(preflight.buckets)}},
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_flip_aug": cfg.flip_aug,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.trigger_phrase": cfg.trigger_word or None,
        "modelspec.title": cfg.output_name,
        **(sd3_metadata(cfg) if sd3 else {}),
    }
