"""The training recipe: config -> dataset -> base model -> LoHA network -> steps -> adapter file.

`train()` checks everything that can be checked before a model loads (config, optimizer, paths, output
folder), then runs a :class:`Trainer`: `setup()` builds each component from the config in data order,
`loss_step()` is the denoising loss of one batch, `optimizer_step()` applies one update, and `train()` is
the loop, top to bottom; validation, samples and saves are separate methods the loop calls.

Gradients are averaged across processes by hand (one all-reduce of the flattened adapter gradients per
optimizer step), which keeps gradient accumulation, module dropout and frozen base weights free of DDP's
special cases.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import all_finite, read_safetensors
from ..models import detect_family, load_pipeline, text_encoders
from ..network import SAVE_DTYPES, add_loha
from . import events
from .checks import check_output_dir, check_paths, config_preflight
from .conditioning import make_conditioner, sdxl_time_ids
from .config import TrainConfig, load
from .ema import AdapterEMA
from .lowmem import (TEXT_ENCODERS, Offloader, base_storage, checkpointing_func, idle_components,
                     store_frozen_base)
from .memory import run_estimate
from .metadata import training_metadata
from .noise import plain_objective
from .objective import training_objective
from .optim import make_optimizer, make_scheduler
from .report import write_loss_log
from .runtime import (StopFlag, TrainingError, all_reduce_grads, enable_te_checkpointing, ensure_loss_scaler, is_oom,
                      log_image, lr_scalars, make_accelerator, oom_advice)
from .sampling import RunSamples
from .state import OutputDirLock, clean_stale_temp, latest_state, load_state, restore_rng, rotate, save_state

__all__ = ["TrainResult", "Trainer", "TrainingError", "train"]


@dataclass
class TrainResult:
    output: Path | None  # the final (or last saved) adapter file
    output_dir: Path
    steps: int
    epochs: int
    stopped: bool  # True when stopped early (Stop button, Ctrl-C); resumable
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    loss_curve: Path | None = None
    preflight: str = ""


def train(config: TrainConfig | dict | str | os.PathLike, *, resume: str | bool | None = None,
          overrides: Sequence[str] = (), on_event: Callable[[events.Event], None] | None = None,
          stop_event: threading.Event | None = None, progress: bool = True) -> TrainResult:
    """Train a LoHA adapter. `config` is a TrainConfig, a dict of options, or a TOML path.

    resume=True continues from the newest state in output_dir; a path continues from that state.
    on_event receives the typed events of sd_loha.train.events (the web UI's live view); stop_event (or
    Ctrl-C / SIGTERM) stops after the current step, saving the adapter and a resumable state.
    """
    loaded = load(config, overrides)  # validates every option, the optimizer class included; logs the warnings
    cfg = loaded.config
    check_paths(cfg, loaded.origins)
    resume_path = _resolve_resume(cfg, resume)
    check_output_dir(cfg, resume=resume_path is not None, origins=loaded.origins)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # One run per folder. Only the main process (rank 0 under accelerate launch) takes the lock.
    main_process = int(os.environ.get("RANK", "0")) == 0
    with OutputDirLock(output_dir) if main_process else contextlib.nullcontext():
        if main_process:
            clean_stale_temp(output_dir)
        trainer = None
        try:
            trainer = Trainer(cfg, output_dir, on_event=on_event, progress=progress)
            trainer.setup(resume_path)
            with StopFlag(stop_event) as stop:
                return trainer.train(stop)
        except Exception as e:
            # Wherever it happens (loading, caching, a step, sampling), running out of memory gets advice;
            # files already saved are complete (atomic writes), so nothing is lost.
            if isinstance(e, TrainingError) or not is_oom(e):
                raise
            raise TrainingError(oom_advice(cfg, e, getattr(trainer, "memory", None))) from None


def _resolve_resume(cfg: TrainConfig, resume: str | bool | None) -> Path | None:
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = latest_state(Path(cfg.output_dir)) if Path(cfg.output_dir).is_dir() else None
        if found is None:
            raise TrainingError(f"--resume: no saved state in output_dir {cfg.output_dir} (looked for state-* folders); "
                                "start without --resume, or point --resume at a state folder")
        return found
    path = Path(resume)
    if not (path / "progress.json").is_file():
        raise TrainingError(f"--resume {path}: not a saved state folder (no progress.json); "
                            f"use a state-* folder from a previous run's output_dir")
    return path


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """The frozen model's dtype; the adapter always trains in fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _every(n: int | None, count: int) -> bool:
    return bool(n) and count % n == 0


class Trainer:
    """One training run. Build with the config, `setup()`, then `train()`; each piece is also callable
    on its own (the tests drive them one by one)."""

    def __init__(self, cfg: TrainConfig, output_dir: Path, *, on_event: Callable[[events.Event], None] | None = None,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.emit = on_event or (lambda e: None)
        self.progress = progress
        self.started = time.time()
        # where the run is: optimizer steps done, epochs finished, batches of the current epoch done
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.losses: list[float] = []
        self.val_losses: list[tuple[int, float]] = []
        self.samples: list[Path] = []
        self.saved: list[Path] = []
        self._resumed_ema: dict | None = None

    # ---- setup: one method per component, in data order ---------------------------------------------
    def setup(self, resume_path: Path | None = None) -> None:
        from accelerate.utils import set_seed

        self.accelerator = make_accelerator(self.cfg)
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self._setup_dataset()
        set_seed(self.cfg.seed)
        self._setup_models()
        self._setup_network()
        self._estimate_memory()
        self.pictures = RunSamples(self.pipe, self.network, self.output_dir / "samples", self.file_weights)
        self._setup_caches()
        self._setup_loader()
        self._setup_optimizer()
        if resume_path is not None:
            self._restore(resume_path)
        # EMA starts from the weights training starts from (the resumed ones, when the state has no EMA)
        self.ema = AdapterEMA(self.params, self.cfg.ema_decay) if self.cfg.ema_decay else None
        if self.ema is not None and self._resumed_ema is not None:
            self.ema.load_state_dict(self._resumed_ema)
        if self.accelerator.num_processes > 1 and self.accelerator.process_index > 0:
            # Every process drew the same LoHA initialisation from the shared seed (it must: gradients are averaged
            # into one set of weights). From here on each draws its own noise and timesteps, or they would all
            # denoise with identical noise. Rank 0 keeps the seeded (or resumed) stream.
            torch.manual_seed(hash((self.cfg.seed, self.accelerator.process_index, self.step)) % (2**63))
        if self.accelerator.trackers == [] and self.accelerator.log_with:
            self.accelerator.init_trackers("sd-loha", config={k: str(v) for k, v in self.cfg.to_dict().items()})

    def _print(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def _setup_dataset(self) -> None:
        from ..data.captions import CaptionOptions
        from ..data.dataset import TrainDataset
        cfg = self.cfg
        self.preflight = config_preflight(cfg, num_processes=self.accelerator.num_processes)
        self.preflight_text = self.preflight.format()
        self._print(self.preflight_text)
        self.emit(events.Preflight(report=self.preflight.to_dict(), text=self.preflight_text))
        self.captions = CaptionOptions(shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                       caption_dropout_rate=cfg.caption_dropout_rate,
                                       tag_dropout_rate=cfg.caption_tag_dropout_rate,
                                       trigger_word=cfg.trigger_word or None)
        self.dataset = TrainDataset(self.preflight, captions=self.captions, flip_aug=cfg.flip_aug,
                                    random_crop=cfg.random_crop, seed=cfg.seed,
                                    prior_loss_weight=cfg.prior_loss_weight)
        self.val_dataset = None
        self.val_captions = CaptionOptions(trigger_word=cfg.trigger_word or None)  # no augmentation when measuring
        if self.preflight.validation_items:
            self.val_dataset = TrainDataset(self.preflight.validation_items, captions=self.val_captions,
                                            seed=cfg.seed, use_repeats=False)

    def _setup_models(self) -> None:
        cfg = self.cfg
        self.weight_dtype = weight_dtype_for(cfg.mixed_precision)
        # The VAE stays fp32 (fp16 VAEs overflow to NaN); samples decode through it in fp32 (sampling.py).
        self.pipe = load_pipeline(cfg.pretrained_model, dtype=self.weight_dtype, vae_dtype=torch.float32, vae=cfg.vae,
                                  config=cfg.base_config)
        if cfg.v_parameterization is not None:
            self.pipe.scheduler.register_to_config(prediction_type="v_prediction" if cfg.v_parameterization else "epsilon")
        self.family = detect_family(self.pipe)
        # the family's noise, timesteps, model call and loss; refuses options that do not fit the loaded model
        self.objective = training_objective(cfg, self.family, self.pipe.scheduler.config)
        self.noise_scheduler = self.objective.scheduler
        self._print(f"base model: {cfg.pretrained_model} ({self.family.label})")
        if not cfg.t5xxl and getattr(self.pipe, "text_encoder_3", None) is not None:
            # trained and sampled without T5, as diffusers' StableDiffusion3Pipeline runs without text_encoder_3
            self.pipe.text_encoder_3, self.pipe.tokenizer_3 = None, None
        parts = text_encoders(self.pipe)
        self.text_encoders = list(parts.values())
        # which of them train with train_text_encoder: SD 3.x's T5 (te3) only with train_t5xxl
        self.te_trained = [cfg.train_text_encoder and (name != "te3" or cfg.train_t5xxl) for name in parts]
        # The denoiser (the UNet, or SD 3.x's MMDiT transformer) joins them on the device once the caches are built
        # and what they needed has left (the end of _setup_caches): the device never holds it and the caching
        # encoders at once.
        self.unet = (self.pipe.transformer if self.family.is_sd3 else self.pipe.unet).requires_grad_(False)
        self._store_frozen_base()
        self.vae = self.pipe.vae.to(self.device).requires_grad_(False).eval()
        for te in self.text_encoders:
            te.to(self.device).requires_grad_(False)
        self.offload = Offloader(self.pipe, (), self.device)  # nothing idle until the caches are built

    def _store_frozen_base(self) -> None:
        """fp8 / nf4 / int8 storage of the frozen UNet (and text encoders, when not trained), before they move to
        the device: bitsandbytes quantizes as the layers move."""
        cfg = self.cfg
        self.base_storage = base_storage(cfg.fp8_base, cfg.base_weight_dtype)
        frozen = [self.unet] + [te for te, trained in zip(self.text_encoders, self.te_trained) if not trained]
        n = sum(store_frozen_base(m, self.base_storage, self.weight_dtype) for m in frozen)
        if n:
            self._print(f"frozen base: {n} layers stored as {self.base_storage}, computing in "
                        f"{str(self.weight_dtype).removeprefix('torch.')}")

    def _setup_network(self) -> None:
        cfg = self.cfg
        self.network = add_loha(
            self.pipe, preset=cfg.preset, rank=cfg.network_dim, alpha=cfg.network_alpha, conv_rank=cfg.conv_dim,
            conv_alpha=cfg.conv_alpha, use_tucker=cfg.use_tucker, text_encoder=cfg.train_text_encoder,
            include=cfg.network_include, exclude=cfg.network_exclude, rank_dropout=cfg.rank_dropout,
            reg_dims=cfg.network_reg_dims, reg_lrs=cfg.network_reg_lrs,
            dora_wd=cfg.dora_wd, wd_on_output=cfg.wd_on_output, use_scalar=cfg.use_scalar,
            module_dropout=cfg.module_dropout, train_t5xxl=cfg.train_t5xxl, sd3_file_form=cfg.sd3_file_form,
        )
        if cfg.network_weights:
            tensors = read_safetensors(cfg.network_weights)[0]
            bad = sorted(k for k, v in tensors.items() if not all_finite(v))
            if bad:
                raise TrainingError(f"network_weights {cfg.network_weights}: {bad[0]} has NaN/Inf values (the run that "
                                    "wrote it diverged); start from an earlier file of that run")
            try:  # the file's alpha wins over network_alpha: it is part of the state dict
                self.network.load_state_dict(tensors, strict=True)
            except (KeyError, ValueError) as e:
                raise TrainingError(f"network_weights {cfg.network_weights} does not fit this network ({e}); it must "
                                    "come from a run with the same base model family, preset, ranks and targets") from None
        self.params = self.network.parameters()
        self._print(self.network.summary())
        if cfg.gradient_checkpointing:
            custom = checkpointing_func(self.base_storage)
            # diffusers < 0.33 takes no checkpointing function (fp8 storage, which needs one, is refused there)
            self.unet.enable_gradient_checkpointing(*([custom] if custom is not None else []))
            for te, trained in zip(self.text_encoders, self.te_trained):
                if trained:
                    enable_te_checkpointing(te)
        self._set_train_mode(True)

    def _set_train_mode(self, training: bool) -> None:
        """Train mode turns on rank/module dropout; the frozen text encoders stay in eval mode unless trained."""
        self.unet.train(training)
        for te, trained in zip(self.text_encoders, self.te_trained):
            te.train(training and trained)

    def _setup_caches(self) -> None:
        from ..data.cache import LatentCache

        cfg = self.cfg
        latents_cached = False
        if cfg.cache_latents:
            cache_dir = self.output_dir / ".cache" / "latents" if cfg.cache_latents_to_disk else None
            cache = LatentCache(_encoder_id(self.vae, "v1"), cache_dir)
            with self.accelerator.main_process_first():
                stats = cache.build(self.dataset, self.encode_pixels, batch_size=4, progress=self.progress and self.main,
                                    on_progress=lambda d, t: self.emit(events.Caching(done=d, total=t)))
            self._print(stats.message)
            latents_cached = stats.enabled
        self.conditioner = make_conditioner(self.pipe, self.family.name, cfg)
        self.text_cache, cached = None, ()
        cacheable = self._cacheable_text_encoders()
        if cacheable and not cfg.train_text_encoder:
            self.text_cache = self._build_text_cache(self._encode_text, "text encoder")
            cached = cacheable if self.text_cache is not None else ()
        elif cacheable:  # SD 3.x with trained CLIPs: T5, frozen, is cached alone (kohya's partial cache)
            t5_cache = self._build_text_cache(self._encode_t5, "T5-XXL")
            if t5_cache is not None:
                self.conditioner.t5_cache = lambda captions: t5_cache.encode_batch(captions, self._encode_t5)
                cached = ("text_encoder_3",)
        # What no step runs waits on the CPU; samples and validation bring back what they use.
        self.offload = Offloader(self.pipe, idle_components(latents_cached=latents_cached, text_cached=bool(cached),
                                                            text_encoders=cached), self.device)
        self.offload.park()
        if self.offload.parked and self.device.type != "cpu":
            self._print(f"kept on the CPU between samples: {', '.join(self.offload.parked)} (cached outputs)")
        self.unet.to(self.device)  # with its LoHA layers; bitsandbytes quantizes its Linear layers here

    def _cacheable_text_encoders(self) -> tuple[str, ...]:
        """The text encoders whose outputs cache_text_encoder_outputs caches, so that they wait on the CPU: all of
        them when none trains, SD 3.x's frozen T5 alone while the CLIPs train."""
        cfg = self.cfg
        if not cfg.cache_text_encoder_outputs:
            return ()
        if not cfg.train_text_encoder:
            return TEXT_ENCODERS[:len(self.text_encoders)]
        return ("text_encoder_3",) if getattr(self.pipe, "text_encoder_3", None) is not None and not cfg.train_t5xxl \
            else ()

    def _estimate_memory(self) -> None:
        """Say what the steps will need on the device before caching starts and the UNet goes there (kohya's and
        OneTrainer's users find out by running out of memory): printed, and sent to the web UI. What will wait on
        the CPU is what _setup_caches will park: the caches it can build are known from the config."""
        cfg = self.cfg
        names = ("vae", *TEXT_ENCODERS)
        # the denoiser is "unet" in the estimate whichever family (SD 3.x's MMDiT transformer included)
        components = {"unet": self.unet, **{n: getattr(self.pipe, n) for n in names
                                             if getattr(self.pipe, n, None) is not None}}
        fixed_captions = not (cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0)
        parked = idle_components(latents_cached=cfg.cache_latents and not cfg.random_crop,
                                 text_cached=fixed_captions, text_encoders=self._cacheable_text_encoders())
        pixels = max(b.bucket[0] * b.bucket[1] for b in self.preflight.buckets)
        held = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        frozen = ["unet"] + [n for n, trained in zip(TEXT_ENCODERS, self.te_trained) if not trained]
        self.memory = run_estimate(cfg, components=components, parked=parked, frozen=frozen, network=self.network,
                                   unet_config=self.unet.config, compute_dtype=self.weight_dtype, pixels=pixels,
                                   device=self.device, held=held)
        text = self.memory.format()
        self._print(text)
        self.emit(events.MemoryEstimate(report=self.memory.to_dict(), text=text, fits=self.memory.fits))

    def _build_text_cache(self, encode: Callable[[list[str]], Any], what: str):
        """Every caption a step can see, encoded once by ``encode``. Caption dropout only adds the empty caption, so
        it is cached too; shuffling or tag dropout make captions open-ended, and then nothing is cached."""
        from ..data.cache import TextEmbeddingCache
        from ..data.captions import caption_variants, options_for

        sets = [caption_variants(it.caption, options_for(self.captions, it.is_reg)) for it in self.preflight.epoch_items]
        sets += [caption_variants(it.caption, self.val_captions) for it in self.preflight.validation_items]
        if any(s is None for s in sets):
            self._print("captions change every step (shuffle_caption / caption_tag_dropout_rate): "
                        f"{what} outputs are computed per step")
            return None
        cache = TextEmbeddingCache(what)
        # In batches of train_batch_size: the encoder then runs at the shapes per-step encoding runs at, and
        # BLAS kernels (their summation order) are chosen by shape.
        n = cache.precompute(sorted(set().union(*sets)), encode, batch_size=self.cfg.train_batch_size)
        self._print(f"{what} outputs cached: {n} captions")
        return cache

    @property
    def _text_keys(self) -> tuple[str, ...]:
        """The conditioner outputs that come from the text encoders (what the text cache holds)."""
        return self.conditioner.keys

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        with self.offload.using(TEXT_ENCODERS):  # on the device for the cache, or for a caption not cached
            cond = self.conditioner(captions, self.device)
        return tuple(cond[k].detach() for k in self._text_keys)

    def _encode_t5(self, captions: list[str]) -> torch.Tensor:
        with self.offload.using(("text_encoder_3",)):
            return self.conditioner.encode_t5(captions, self.device).detach()

    def _setup_loader(self) -> None:
        from ..data.dataset import BucketBatchSampler, collate_examples

        cfg = self.cfg
        self.sampler = BucketBatchSampler(self.dataset, cfg.train_batch_size, seed=cfg.seed,
                                          process_index=self.accelerator.process_index,
                                          num_processes=self.accelerator.num_processes)
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate_examples,
                                                  num_workers=cfg.max_data_loader_n_workers,
                                                  generator=torch.Generator())  # keeps the global RNG (noise) resumable
        self.batches_per_epoch = len(self.sampler)
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / cfg.gradient_accumulation_steps))
        self.total_steps = cfg.max_train_epochs * self.steps_per_epoch if cfg.max_train_epochs else cfg.max_train_steps
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        groups = self.network.param_groups(cfg.effective_unet_lr, cfg.effective_text_encoder_lr)
        optimizer = make_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, cfg.optimizer_args,
                                   fused_ok=self.device.type == "cuda")
        self.lr_scheduler = make_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.warmup_steps_for(self.total_steps),
                                           total_steps=self.total_steps, num_cycles=cfg.lr_scheduler_num_cycles,
                                           power=cfg.lr_scheduler_power)
        self._own_scaler = ensure_loss_scaler(self.accelerator, cfg.mixed_precision)
        self.optimizer = self.accelerator.prepare(optimizer)  # loss scaling; the scheduler stays ours (one step per step)

    def _restore(self, resume_path: Path) -> None:
        state = load_state(resume_path)
        self.network.load_raw_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        restore_rng(state)
        prog = state["progress"]
        self.step, self.epoch, self.batches_done = prog["step"], prog["epoch"], prog["batches_done"]
        self.losses = [float(v) for v in prog.get("losses", [])]  # the whole run's curve, not just the resumed part
        self.val_losses = [(int(s), float(v)) for s, v in prog.get("val_losses", [])]
        self._resumed_ema = state["ema"]
        self._print(f"resumed from {resume_path}: step {self.step}, epoch {self.epoch + 1}")

    # ---- one step -------------------------------------------------------------------------------------
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        # The distribution's mean, not a sample: cached and uncached runs then see identical latents.
        cfg = self.vae.config
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mode()
        return (latents - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The UNet's conditioning for the batch's captions (from the text-encoder cache when there is one)."""
        if self.text_cache is not None:
            cond = dict(zip(self._text_keys, self.text_cache.encode_batch(batch["captions"], self._encode_text)))
        else:
            cond = self.conditioner(batch["captions"], self.device)
        out: dict[str, Any] = {k: cond[k].to(self.weight_dtype) for k in self._text_keys}
        out["added_cond_kwargs"] = None
        if self.family.is_sdxl:
            out["added_cond_kwargs"] = {
                "text_embeds": out.pop("text_embeds"),
                "time_ids": sdxl_time_ids(batch["original_sizes"].tolist(), batch["crop_top_lefts"].tolist(),
                                          batch["target_sizes"].tolist(), self.device, self.weight_dtype)}
        return out

    def loss_step(self, batch: dict[str, Any], generator: torch.Generator | None = None, *,
                  objective: TrainConfig | None = None) -> torch.Tensor:
        """The denoising loss of one batch: noise the latents at random timesteps, predict, compare. `objective`:
        the config whose noise and weighting options apply (the training config by default)."""
        cfg = objective or self.cfg
        latents = (batch["latents"].to(self.device, torch.float32) if "latents" in batch
                   else self.encode_pixels(batch["pixel_values"]))
        draw = self.objective.draw(cfg, latents, generator)
        cond = self.conditioning(batch)
        with self.accelerator.autocast():
            pred = self.objective.predict(self.unet, draw.noisy.to(self.weight_dtype), draw.timesteps, cond)
        return self.objective.loss(cfg, pred, latents, draw, mask=batch.get("loss_mask"),
                                   sample_weights=batch.get("loss_weight"))

    def optimizer_step(self) -> None:
        """Clip, update, advance the schedule, average into the EMA."""
        if self.cfg.max_grad_norm:
            if self._own_scaler:  # accelerate only unscales its own (CUDA) scaler before clipping
                self.accelerator.scaler.unscale_(self.optimizer.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            else:
                self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step += 1

    def _sync(self, loss: float, stop: bool) -> tuple[float, bool]:
        """With several processes: one all-reduce for the gradients, the loss and the stop flag, so a NaN on any
        process, or a stop seen by any process, ends every process at the same step (none waits in a collective)."""
        if self.accelerator.num_processes == 1:
            return loss, stop
        loss, stop = all_reduce_grads(self.accelerator, self.params, loss, stop)
        if not math.isfinite(loss):
            raise self._nan_error(loss)
        return loss, stop

    # ---- what the run shows: the weights the saved file holds ----------------------------------------------
    def file_weights(self):
        """A context in which the live network holds what the saved file holds (the EMA average, when on)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def validation_loss(self) -> float:
        """Mean loss over the held-out images, same noise and timesteps every time, no dropout, and the plain
        objective (no noise or weighting options), so runs with different options stay comparable."""
        from ..data.dataset import collate_examples

        gen, objective = torch.Generator().manual_seed(self.cfg.seed + 1), plain_objective(self.cfg)
        total = 0.0
        self._set_train_mode(False)
        try:  # held-out images are not in the latent cache: the VAE encodes them
            with torch.no_grad(), self.file_weights(), self.offload.using(("vae",)):
                for i in range(len(self.val_dataset)):
                    batch = collate_examples([self.val_dataset[(i, 0)]])
                    total += float(self.loss_step(batch, gen, objective=objective))
        finally:
            self._set_train_mode(True)
        return total / max(len(self.val_dataset), 1)

    def record_validation(self) -> None:
        v = self.validation_loss()
        self.val_losses.append((self.step, v))
        self.accelerator.log({"val_loss": v}, step=self.step)
        self.emit(events.Validation(step=self.step, loss=v))

    def make_samples(self, tag: str) -> Path | None:
        """samples/<tag>.png: the sample prompts (rows) at each sample strength (columns)."""
        if not self.main or not self.cfg.sample_prompts:
            return None
        with self.offload.using():
            return self._publish("samples", self.pictures.step_grid(self.cfg, self.step, tag))

    def write_progress(self) -> Path | None:
        """samples/progress.png: the base, then every sample step of this run at the last sample strength."""
        if not self.main or not self.pictures.has_progress:  # nothing to draw: bring nothing back to the device
            return None
        with self.offload.using():
            return self._publish("progress", self.pictures.progress_grid(self.cfg))

    def _publish(self, name: str, made: tuple[Any, Path] | None) -> Path | None:
        """A grid the run made: to the trackers, the result and the event stream."""
        if made is None:
            return None
        grid, path = made
        log_image(self.accelerator, name, grid, self.step)
        self.samples.append(path)
        self.emit(events.Sample(path=str(path), step=self.step))
        return path

    # ---- saving ------------------------------------------------------------------------------------------------
    def save_adapter(self, name: str) -> Path:
        cfg = self.cfg
        limit = torch.finfo(SAVE_DTYPES[cfg.save_precision]).max
        with self.file_weights():
            if not all(bool(torch.isfinite(w).all()) and float(w.detach().abs().max()) <= limit for w in self.params):
                # never write a file that loads as NaN/inf (or overflows the save precision) into someone's model
                raise TrainingError(
                    f"the LoHA weights diverged by step {self.step} (inf/NaN, or beyond {cfg.save_precision} range): "
                    f"the learning rate ({cfg.learning_rate:g}) is too high; try a tenth of it. Nothing was saved for "
                    "this step" + (f"; the last saved adapter is intact: {self.saved[-1]}" if self.saved else "") + "."
                )
            meta = training_metadata(cfg, self.preflight, step=self.step, epoch=self.epochs_seen(), started=self.started,
                                     num_processes=self.accelerator.num_processes, sd3=self.family.is_sd3)
            path = self.network.save(self.output_dir / f"{name}.safetensors", metadata=meta,
                                     dtype=SAVE_DTYPES[cfg.save_precision])
        self.saved.append(path)
        self.emit(events.Saved(path=str(path), step=self.step))
        return path

    def save_resumable(self) -> Path:
        scaler = self.accelerator.scaler
        return save_state(self.output_dir, self.step, network_sd=self.network.raw_state_dict(),
                          optimizer=self.optimizer, scheduler=self.lr_scheduler,
                          ema=self.ema.state_dict() if self.ema is not None else None,
                          scaler=scaler.state_dict() if scaler is not None else None,
                          progress={"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                                    "total_steps": self.total_steps, "losses": self.losses,
                                    "val_losses": self.val_losses})

    def checkpoint(self, tags: list[str]) -> None:
        """The adapter file for each tag, rotation, then one resumable state."""
        if not self.main or not tags:
            return
        name = self.cfg.output_name
        for tag in tags:
            self.save_adapter(f"{name}-{tag}")
        rotate(self.output_dir, f"{name}-step*.safetensors", self.cfg.save_last_n)
        rotate(self.output_dir, f"{name}-epoch*.safetensors", self.cfg.save_last_n)
        if self.cfg.save_state:
            self.save_resumable()
            rotate(self.output_dir, "state-*", self.cfg.save_last_n or 2)

    def epochs_seen(self) -> int:
        # `epoch` counts finished epochs once the last batch of one is done (batches_done back to 0)
        return max(1, self.epoch + (1 if self.batches_done else 0))

    def _nan_error(self, value: float) -> TrainingError:
        cfg = self.cfg
        return TrainingError(
            f"loss became {value} at step {self.step + 1}. Likely causes: learning rate too high "
            f"({cfg.learning_rate:g}; LoHA at rank {cfg.network_dim} diverges fast, try half), or fp16 "
            "overflow (use mixed_precision = \"bf16\" or \"no\"). The last saved adapter is intact"
            + (f": {self.saved[-1]}" if self.saved else "") + "."
        )

    # ---- the loop ------------------------------------------------------------------------------------------------
    def train(self, stop: StopFlag) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self._print(f"training {self.total_steps} steps ({self.total_epochs} epochs of {self.steps_per_epoch} steps), "
                    f"batch {cfg.train_batch_size} x {acc.num_processes} processes x {cfg.gradient_accumulation_steps} "
                    "accumulation")
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not (self.progress and self.main), dynamic_ncols=True)
        if cfg.sample_at_first and self.step == 0:
            self.make_samples("at_first")  # the starting point; sorts before epoch*/final/progress/step*
        stopped = False
        t_last, step_times = time.time(), []
        accum_loss, micro = 0.0, 0
        while self.step < self.total_steps and not stopped:
            self.sampler.set_epoch(self.epoch, skip_batches=self.batches_done)
            self.dataset.set_epoch(self.epoch)
            for batch in self.loader:
                loss = self.loss_step(batch)
                if acc.num_processes == 1 and not torch.isfinite(loss):
                    raise self._nan_error(float(loss.detach()))  # several processes check together in _sync
                acc.backward(loss / cfg.gradient_accumulation_steps)
                accum_loss += loss.item()
                micro += 1
                self.batches_done += 1
                epoch_ended = self.batches_done >= self.batches_per_epoch
                if micro % cfg.gradient_accumulation_steps and not epoch_ended:
                    continue
                # The logged loss is the window's mean: an epoch's last window may hold fewer micro-batches.
                accum_loss, stop_seen = self._sync(accum_loss / micro, stop.is_set)
                self.optimizer_step()
                micro = 0
                self.losses.append(accum_loss)
                now = time.time()
                step_times.append(now - t_last)
                t_last = now
                rate = len(step_times[-20:]) / sum(step_times[-20:])
                lr = self.lr_scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{accum_loss:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                acc.log({"loss": accum_loss, **lr_scalars(self.lr_scheduler, self.optimizer)}, step=self.step)
                self.emit(events.Progress(step=self.step, total=self.total_steps, epoch=self.epoch + 1, loss=accum_loss,
                                          lr=lr, it_s=rate, eta_s=(self.total_steps - self.step) / rate))
                accum_loss = 0.0

                # Epoch-end work happens right after the epoch's last step, also when that step ends the run.
                if epoch_ended:
                    self.epoch += 1
                    self.batches_done = 0
                done = self.step >= self.total_steps
                self._periodic_work(epoch_ended, done)
                if (stop_seen if acc.num_processes > 1 else stop.is_set) and not done:
                    stopped = True
                    break
                if done or epoch_ended:
                    break
            else:  # nothing left of this epoch (a state saved at an epoch's very end by an older version)
                self.epoch += 1
                self.batches_done = 0
        bar.close()
        return self._finish(stopped)

    def _periodic_work(self, epoch_ended: bool, done: bool) -> None:
        """Validation, samples and saves due after this step (the end of the run makes its own below)."""
        cfg = self.cfg
        if self.val_dataset is not None and (_every(cfg.validation_every_n_steps, self.step)
                                             or (epoch_ended and not cfg.validation_every_n_steps)):
            self.record_validation()
        if done:
            return
        if _every(cfg.sample_every_n_steps, self.step):
            self.make_samples(f"step{self.step:06d}")
        elif epoch_ended and _every(cfg.sample_every_n_epochs, self.epoch):
            self.make_samples(f"epoch{self.epoch:04d}")
        tags = []
        if _every(cfg.save_every_n_steps, self.step):
            tags.append(f"step{self.step:06d}")
        if epoch_ended and _every(cfg.save_every_n_epochs, self.epoch):
            tags.append(f"epoch{self.epoch:04d}")
        self.checkpoint(tags)

    def _finish(self, stopped: bool) -> TrainResult:
        cfg = self.cfg
        if self.val_dataset is not None and not stopped and (not self.val_losses or self.val_losses[-1][0] != self.step):
            self.record_validation()  # the validation loss of the final adapter
        # Every process reports the file; the main process writes it (the others wait for it below).
        final = self.output_dir / (f"{cfg.output_name}-step{self.step:06d}.safetensors" if stopped
                                   else f"{cfg.output_name}.safetensors")
        curve = None
        if self.main:
            final = self.save_adapter(final.stem)
            if stopped:
                state_dir = self.save_resumable()
                print(f"stopped at step {self.step}: adapter {final}, resume with --resume {state_dir}", flush=True)
            else:
                if cfg.save_state:
                    self.save_resumable()
                    rotate(self.output_dir, "state-*", cfg.save_last_n or 2)
                self.make_samples("final")
                self.write_progress()
            curve = write_loss_log(self.output_dir, self.step, self.losses, self.val_losses)
            print(f"saved {final}", flush=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.network.remove()
        self.emit(events.Done(output=str(final), stopped=stopped, step=self.step))
        return TrainResult(final, self.output_dir, self.step, self.epochs_seen(), stopped, self.losses, self.val_losses,
                           self.samples, self.saved, curve, self.preflight_text)


def _encoder_id(vae, resolution_key: str) -> str:
    cfg = json.dumps(dict(vae.config), sort_keys=True, default=str)
    w = next(vae.parameters())
    fingerprint = float(w.detach().flatten()[:1000].double().sum())  # different weights -> different latents
    return hashlib.sha256(f"{cfg}|{fingerprint:.12e}|{resolution_key}".encode()).hexdigest()[:16]
