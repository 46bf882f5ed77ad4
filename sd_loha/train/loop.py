"""The training loop: config -> dataset -> base model -> LoHA network -> steps -> adapter file.

It reads top to bottom. Everything that can be checked before a model loads (config, paths, output
folder, the dataset preflight) is checked first. Gradients are averaged across processes by hand
(one all-reduce of the flattened adapter gradients per optimizer step), which keeps gradient
accumulation, module dropout and frozen base weights free of DDP's special cases.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import schedulers
from ..io import read_safetensors
from ..models import detect_family, load_pipeline
from ..network import SAVE_DTYPES, LoHANetwork, add_loha
from .checks import check_output_dir, check_paths
from .conditioning import Conditioner, sdxl_time_ids
from .config import TrainConfig, as_config
from .loss import diffusion_loss
from .optim import make_optimizer, make_scheduler
from .report import image_grid, loss_curve
from .state import OutputDirLock, clean_stale_temp, latest_state, load_state, restore_rng, rotate, save_state

logger = logging.getLogger(__name__)
Event = dict[str, Any]


class TrainingError(RuntimeError):
    """Training stopped for a reason the user can act on; the message says what to do."""


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


class _StopFlag:
    """Set by the web UI's Stop button (a threading.Event) or by SIGINT/SIGTERM."""

    def __init__(self, event: threading.Event | None) -> None:
        self.event = event
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # second Ctrl-C: give up on saving
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("stop requested: saving the adapter and resumable state after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def is_set(self) -> bool:
        return self.signal is not None or (self.event is not None and self.event.is_set())


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


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _encoder_id(vae, resolution_key: str) -> str:
    cfg = json.dumps(dict(vae.config), sort_keys=True, default=str)
    w = next(vae.parameters())
    fingerprint = float(w.detach().flatten()[:1000].double().sum())  # different weights -> different latents
    digest = hashlib.sha256(f"{cfg}|{fingerprint:.12e}|{resolution_key}".encode()).hexdigest()[:16]
    return digest


def _training_metadata(cfg: TrainConfig, preflight, *, step: int, epoch: int, started: float,
                       num_processes: int) -> dict[str, Any]:
    from collections import Counter

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
        "ss_num_batches_per_epoch": preflight.steps_per_epoch,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * num_processes * cfg.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": cfg.seed,
        "ss_clip_skip": cfg.clip_skip,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_noise_offset": cfg.noise_offset or None,
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
    }


def train(config: TrainConfig | dict | str | os.PathLike, *, resume: str | bool | None = None,
          overrides: Sequence[str] = (), on_event: Callable[[Event], None] | None = None,
          stop_event: threading.Event | None = None, progress: bool = True) -> TrainResult:
    """Train a LoHA adapter. `config` is a TrainConfig, a dict of options, or a TOML path.

    resume=True continues from the newest state in output_dir; a path continues from that state.
    on_event receives progress/sample/save/done events (the web UI's live view); stop_event (or
    Ctrl-C / SIGTERM) stops after the current step, saving the adapter and a resumable state.
    """
    cfg = as_config(config, overrides)
    check_paths(cfg)
    resume_path = _resolve_resume(cfg, resume)
    check_output_dir(cfg, resume=resume_path is not None)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # One run per folder. Only the main process (rank 0 under accelerate launch) takes the lock.
    main_process = int(os.environ.get("RANK", "0")) == 0
    with OutputDirLock(output_dir) if main_process else contextlib.nullcontext():
        if main_process:
            clean_stale_temp(output_dir)
        try:
            return _run(cfg, resume_path, output_dir, on_event or (lambda e: None), stop_event, progress)
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
            # Wherever it happens (loading, caching, a step, sampling), running out of memory gets advice;
            # files already saved are complete (atomic writes), so nothing is lost.
            if isinstance(e, TrainingError) or not _is_oom(e):
                raise
            raise TrainingError(oom_advice(cfg, e)) from None


def _run(cfg: TrainConfig, resume_path: Path | None, output_dir: Path, emit: Callable[[Event], None],
         stop_event: threading.Event | None, progress: bool) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from ..data.cache import LatentCache, TextEmbeddingCache
    from ..data.captions import CaptionOptions
    from ..data.dataset import BucketBatchSampler, TrainDataset, collate_examples
    from ..data.preflight import run_preflight

    started = time.time()

    launched = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun / accelerate launch --multi_gpu set it
    accelerator = Accelerator(
        # accelerate only forms a CPU process group (gloo) when told it runs on CPU; without this, processes
        # launched on a machine without an accelerator would each train alone and write the same files
        cpu=launched > 1 and not _has_accelerator(),
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.log_with == "none" else ("tensorboard" if cfg.log_with in ("tensorboard", "auto") and _has_tensorboard() else None),
        project_dir=cfg.effective_logging_dir,
    )
    main = accelerator.is_main_process
    device = accelerator.device
    if launched > 1 and accelerator.num_processes != launched:
        raise TrainingError(f"{launched} processes were launched (WORLD_SIZE) but accelerate set up "
                            f"{accelerator.num_processes}: they would train separately and overwrite each other's files")
    if launched == 1 and accelerator.num_processes == 1 and "MASTER_PORT" in os.environ and main:
        print("note: one training process. `accelerate launch --num_processes N` starts N processes only on N GPUs "
              "(or under mpirun); on CPU use `accelerate launch --multi_gpu --num_processes N ...`", flush=True)

    # ---- 2. dataset preflight ------------------------------------------------------------------
    preflight = run_preflight(
        cfg.train_data_dir, resolution=cfg.resolution, enable_bucket=cfg.enable_bucket,
        min_bucket_reso=cfg.min_bucket_reso, max_bucket_reso=cfg.max_bucket_reso,
        bucket_reso_steps=cfg.bucket_reso_steps, bucket_no_upscale=cfg.bucket_no_upscale,
        caption_extension=cfg.caption_extension, batch_size=cfg.train_batch_size,
        validation_split=cfg.validation_split, seed=cfg.seed, trigger_word=cfg.trigger_word or None,
        num_processes=accelerator.num_processes,
    )
    preflight_text = preflight.format()
    if main:
        print(preflight_text, flush=True)
    emit({"type": "preflight", "report": preflight.to_dict(), "text": preflight_text})

    # ---- 3. base model -------------------------------------------------------------------------
    set_seed(cfg.seed)
    pipe = load_pipeline(cfg.pretrained_model, dtype=torch.float32, vae=cfg.vae)
    if cfg.v_parameterization is not None:
        pipe.scheduler.register_to_config(prediction_type="v_prediction" if cfg.v_parameterization else "epsilon")
    family = detect_family(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if main:
        print(f"base model: {cfg.pretrained_model} ({family.label})", flush=True)
    weight_dtype = _weight_dtype(cfg.mixed_precision)
    vae = pipe.vae.to(device, dtype=torch.float32).requires_grad_(False).eval()  # fp32: fp16 VAEs overflow to NaN
    unet = pipe.unet.to(device, dtype=weight_dtype).requires_grad_(False)
    text_encoders = [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]
    for te in text_encoders:
        te.to(device, dtype=weight_dtype).requires_grad_(False)

    # ---- 4. the LoHA network -------------------------------------------------------------------
    network = add_loha(
        pipe, preset=cfg.preset, rank=cfg.network_dim, alpha=cfg.network_alpha, conv_rank=cfg.conv_dim,
        conv_alpha=cfg.conv_alpha, use_tucker=cfg.use_tucker, text_encoder=cfg.train_text_encoder,
        include=cfg.network_include, exclude=cfg.network_exclude, rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout,
    )
    if cfg.network_weights:
        try:
            network.load_state_dict(read_safetensors(cfg.network_weights)[0], strict=True)
        except (KeyError, ValueError) as e:
            raise TrainingError(f"network_weights {cfg.network_weights} does not fit this network ({e}); it must come "
                                "from a run with the same base model family, preset, ranks and targets") from None
    params = network.parameters()
    if main:
        print(network.summary(), flush=True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in text_encoders:
                _enable_te_checkpointing(te)
    unet.train()
    for te in text_encoders:
        te.train(cfg.train_text_encoder)

    # ---- 5. data, caches -------------------------------------------------------------------------
    captions = CaptionOptions(shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                              caption_dropout_rate=cfg.caption_dropout_rate,
                              tag_dropout_rate=cfg.caption_tag_dropout_rate, trigger_word=cfg.trigger_word or None)
    dataset = TrainDataset(preflight, captions=captions, flip_aug=cfg.flip_aug, random_crop=cfg.random_crop, seed=cfg.seed)
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
        # The distribution's mean, not a sample: cached and uncached runs then see identical latents.
        with torch.no_grad():
            latents = vae.encode(pixels.to(device, torch.float32)).latent_dist.mode()
        return (latents - shift) * scaling

    if cfg.cache_latents:
        cache_dir = output_dir / ".cache" / "latents" if cfg.cache_latents_to_disk else None
        cache = LatentCache(_encoder_id(vae, "v1"), cache_dir)
        with accelerator.main_process_first():
            stats = cache.build(dataset, encode_pixels, batch_size=4, progress=progress and main,
                                on_progress=lambda d, t: emit({"type": "caching", "done": d, "total": t}))
        if main:
            print(stats.message, flush=True)

    conditioner = Conditioner(pipe, sdxl=family.is_sdxl, clip_skip=cfg.clip_skip, train_text_encoder=cfg.train_text_encoder)
    text_cache = None
    if not cfg.train_text_encoder:
        if captions.is_static and cfg.cache_text_encoder_outputs:
            text_cache = TextEmbeddingCache("te")
        elif cfg.cache_text_encoder_outputs and main:
            print("captions change every step (shuffle/dropout): text encoder outputs are computed per step", flush=True)

    sampler = BucketBatchSampler(dataset, cfg.train_batch_size, seed=cfg.seed,
                                 process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_examples,
                                         num_workers=cfg.max_data_loader_n_workers,
                                         generator=torch.Generator())  # keeps the global RNG (noise) resumable
    batches_per_epoch = len(sampler)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
    total_steps = cfg.max_train_epochs * steps_per_epoch if cfg.max_train_epochs else cfg.max_train_steps
    total_epochs = math.ceil(total_steps / steps_per_epoch)

    # ---- 6. optimizer, schedule, resume ----------------------------------------------------------
    groups = network.param_groups(cfg.effective_unet_lr, cfg.effective_text_encoder_lr)
    optimizer = make_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, cfg.optimizer_args,
                               fused_ok=device.type == "cuda")
    lr_scheduler = make_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.warmup_steps_for(total_steps),
                                  total_steps=total_steps, num_cycles=cfg.lr_scheduler_num_cycles,
                                  power=cfg.lr_scheduler_power)
    optimizer = accelerator.prepare(optimizer)  # fp16 loss scaling; the scheduler stays ours (one step per step)

    global_step, epoch, batches_done = 0, 0, 0
    losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    state = None
    if resume_path is not None:
        state = load_state(resume_path)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["scheduler"])
        restore_rng(state)
        prog = state["progress"]
        global_step, epoch, batches_done = prog["step"], prog["epoch"], prog["batches_done"]
        losses = [float(v) for v in prog.get("losses", [])]  # the whole run's curve, not just the resumed part
        val_losses = [(int(s), float(v)) for s, v in prog.get("val_losses", [])]
        if main:
            print(f"resumed from {resume_path}: step {global_step}, epoch {epoch + 1}", flush=True)
    # EMA starts from the weights training starts from (the resumed ones, when the state has no EMA)
    ema = [p.detach().clone() for p in params] if cfg.ema_decay else None
    if ema is not None and state is not None and state["ema"] is not None:
        for e, v in zip(ema, state["ema"]["params"]):
            e.copy_(v)
    if accelerator.num_processes > 1 and accelerator.process_index > 0:
        # Every process drew the same LoHA initialisation from the shared seed (it must: gradients are averaged
        # into one set of weights). From here on each draws its own noise and timesteps, or they would all
        # denoise with identical noise. Rank 0 keeps the seeded (or resumed) stream.
        torch.manual_seed(hash((cfg.seed, accelerator.process_index, global_step)) % (2**63))

    val_dataset = None
    if preflight.validation_items:
        val_dataset = TrainDataset(preflight.validation_items, captions=CaptionOptions(trigger_word=cfg.trigger_word or None),
                                   seed=cfg.seed, use_repeats=False)

    samples: list[Path] = []
    saved: list[Path] = []
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers("sd-loha", config={k: str(v) for k, v in cfg.to_dict().items()})

    # ---- helpers that read the variables above -----------------------------------------------------
    def step_loss(batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        if "latents" in batch:
            latents = batch["latents"].to(device, torch.float32)
        else:
            latents = encode_pixels(batch["pixel_values"])
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((bsz, latents.shape[1], 1, 1), generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if text_cache is not None:
            keys = ("encoder_hidden_states", "text_embeds") if family.is_sdxl else ("encoder_hidden_states",)
            cached = text_cache.encode_batch(
                batch["captions"], lambda caps: tuple(conditioner(caps, device)[k].detach() for k in keys))
            cond = dict(zip(keys, cached))
        else:
            cond = conditioner(batch["captions"], device)
        added = None
        if family.is_sdxl:
            added = {"text_embeds": cond["text_embeds"].to(weight_dtype),
                     "time_ids": sdxl_time_ids(batch["original_sizes"].tolist(), batch["crop_top_lefts"].tolist(),
                                               batch["target_sizes"].tolist(), device, weight_dtype)}
        with accelerator.autocast():
            pred = unet(noisy.to(weight_dtype), timesteps, cond["encoder_hidden_states"].to(weight_dtype),
                        added_cond_kwargs=added).sample
        return diffusion_loss(noise_scheduler, pred, latents, noise, timesteps, loss_type=cfg.loss_type,
                              huber_c=cfg.huber_c, min_snr_gamma=cfg.min_snr_gamma)

    def validation_loss() -> float:
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # same noise and timesteps every time
        total, n = 0.0, 0
        modules = [unet, *text_encoders]
        for m in modules:
            m.eval()  # no rank/module dropout while measuring
        try:
            with torch.no_grad():
                for i in range(len(val_dataset)):
                    batch = collate_examples([val_dataset[(i, 0)]])
                    total += float(step_loss(batch, gen))
                    n += 1
        finally:
            unet.train()
            for te in text_encoders:
                te.train(cfg.train_text_encoder)
        return total / max(n, 1)

    def record_validation() -> None:
        v = validation_loss()
        val_losses.append((global_step, v))
        accelerator.log({"val_loss": v}, step=global_step)
        emit({"type": "validation", "step": global_step, "loss": v})

    def epochs_seen() -> int:
        # `epoch` counts finished epochs once the last batch of one is done (batches_done back to 0)
        return max(1, epoch + (1 if batches_done else 0))

    def nan_error(value: float) -> TrainingError:
        return TrainingError(
            f"loss became {value} at step {global_step + 1}. Likely causes: learning rate too high "
            f"({cfg.learning_rate:g}; LoHA at rank {cfg.network_dim} diverges fast, try half), or fp16 "
            "overflow (use mixed_precision = \"bf16\" or \"no\"). The last saved adapter is intact"
            + (f": {saved[-1]}" if saved else "") + "."
        )

    def save_adapter(name: str) -> Path:
        weights = ema if ema is not None else params
        limit = torch.finfo(SAVE_DTYPES[cfg.save_precision]).max
        if not all(bool(torch.isfinite(w).all()) and float(w.detach().abs().max()) <= limit for w in weights):
            # never write a file that loads as NaN/inf (or overflows the save precision) into someone's model
            raise TrainingError(
                f"the LoHA weights diverged by step {global_step} (inf/NaN, or beyond {cfg.save_precision} range): "
                f"the learning rate ({cfg.learning_rate:g}) is too high; try a tenth of it. Nothing was saved for this "
                "step" + (f"; the last saved adapter is intact: {saved[-1]}" if saved else "") + "."
            )
        if ema is not None:  # the file gets the EMA weights; training continues on the raw ones
            raw = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, ema):
                    p.copy_(e)
        try:
            meta = _training_metadata(cfg, preflight, step=global_step, epoch=epochs_seen(), started=started,
                                      num_processes=accelerator.num_processes)
            path = network.save(output_dir / f"{name}.safetensors", metadata=meta, dtype=SAVE_DTYPES[cfg.save_precision])
        finally:
            if ema is not None:
                with torch.no_grad():
                    for p, r in zip(params, raw):
                        p.copy_(r)
        saved.append(path)
        emit({"type": "saved", "path": str(path), "step": global_step})
        return path

    def save_resumable() -> Path:
        return save_state(output_dir, global_step, network_sd=network.state_dict(torch.float32), optimizer=optimizer,
                          scheduler=lr_scheduler, ema={"params": ema} if ema is not None else None,
                          progress={"step": global_step, "epoch": epoch, "batches_done": batches_done,
                                    "total_steps": total_steps, "losses": losses, "val_losses": val_losses})

    def checkpoint(tags: list[str]) -> None:
        if not main or not tags:
            return
        for tag in tags:
            save_adapter(f"{cfg.output_name}-{tag}")
        rotate(output_dir, f"{cfg.output_name}-step*.safetensors", cfg.save_last_n)
        rotate(output_dir, f"{cfg.output_name}-epoch*.safetensors", cfg.save_last_n)
        if cfg.save_state:
            save_resumable()
            rotate(output_dir, "state-*", cfg.save_last_n or 2)

    def make_samples(tag: str) -> None:
        if not main or not cfg.sample_prompts:
            return
        path = sample_grid(pipe, network, cfg, output_dir / "samples" / f"{tag}.png")
        samples.append(path)
        emit({"type": "sample", "path": str(path), "step": global_step})

    def every(n: int | None, count: int) -> bool:
        return bool(n) and count % n == 0

    # ---- 7. the loop -----------------------------------------------------------------------------------
    if main:
        print(f"training {total_steps} steps ({total_epochs} epochs of {steps_per_epoch} steps), "
              f"batch {cfg.train_batch_size} x {accelerator.num_processes} processes x {cfg.gradient_accumulation_steps} "
              f"accumulation", flush=True)
    bar = tqdm(total=total_steps, initial=global_step, desc="training", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    stopped = False
    t_last, step_times = time.time(), []
    accum_loss, micro = 0.0, 0
    with _StopFlag(stop_event) as stop:
        while global_step < total_steps and not stopped:
            sampler.set_epoch(epoch, skip_batches=batches_done)
            dataset.set_epoch(epoch)
            for batch in loader:
                loss = step_loss(batch)
                if accelerator.num_processes == 1 and not torch.isfinite(loss):
                    raise nan_error(float(loss.detach()))  # several processes check together below, so none waits forever
                accelerator.backward(loss / cfg.gradient_accumulation_steps)
                accum_loss += loss.item() / cfg.gradient_accumulation_steps
                micro += 1
                batches_done += 1
                epoch_ended = batches_done >= batches_per_epoch
                if micro % cfg.gradient_accumulation_steps and not epoch_ended:
                    continue
                stop_seen = False
                if accelerator.num_processes > 1:
                    # One all-reduce for the gradients, the loss and the stop flag: a NaN on any process, or a stop
                    # seen by any process, ends every process at the same step (none is left waiting in a collective).
                    accum_loss, stop_seen = _all_reduce_grads(accelerator, params, accum_loss, stop.is_set)
                    if not math.isfinite(accum_loss):
                        raise nan_error(accum_loss)
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    with torch.no_grad():
                        for e, p in zip(ema, params):
                            e.lerp_(p.detach(), 1.0 - cfg.ema_decay)
                global_step += 1
                micro = 0
                losses.append(accum_loss)
                now = time.time()
                step_times.append(now - t_last)
                t_last = now
                rate = 1.0 / (sum(step_times[-20:]) / len(step_times[-20:]))
                bar.set_postfix(loss=f"{accum_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
                accelerator.log({"loss": accum_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                emit({"type": "progress", "step": global_step, "total": total_steps, "epoch": epoch + 1,
                      "loss": accum_loss, "it_s": rate, "eta_s": (total_steps - global_step) / rate})
                accum_loss = 0.0

                # Epoch-end work happens right after the epoch's last step, also when that step ends the run
                # (a for-else on the loader skipped it then, and a run shorter than an epoch never validated).
                if epoch_ended:
                    epoch += 1
                    batches_done = 0
                done = global_step >= total_steps
                if val_dataset is not None and (every(cfg.validation_every_n_steps, global_step)
                                                or (epoch_ended and not cfg.validation_every_n_steps)):
                    record_validation()
                if not done:  # the end of the run makes the final samples and file below
                    if every(cfg.sample_every_n_steps, global_step):
                        make_samples(f"step{global_step:06d}")
                    elif epoch_ended and every(cfg.sample_every_n_epochs, epoch):
                        make_samples(f"epoch{epoch:04d}")
                    tags = []
                    if every(cfg.save_every_n_steps, global_step):
                        tags.append(f"step{global_step:06d}")
                    if epoch_ended and every(cfg.save_every_n_epochs, epoch):
                        tags.append(f"epoch{epoch:04d}")
                    checkpoint(tags)  # adapter file(s), then one resumable state
                if (stop_seen if accelerator.num_processes > 1 else stop.is_set) and not done:
                    stopped = True
                    break
                if done or epoch_ended:
                    break
            else:  # nothing left of this epoch (a state saved at an epoch's very end by an older version)
                epoch += 1
                batches_done = 0
    bar.close()
    if val_dataset is not None and not stopped and (not val_losses or val_losses[-1][0] != global_step):
        record_validation()  # the validation loss of the final adapter

    # ---- 8. the result -------------------------------------------------------------------------------------
    # Every process reports the file; the main process writes it (the others wait for it below).
    final = output_dir / (f"{cfg.output_name}-step{global_step:06d}.safetensors" if stopped
                          else f"{cfg.output_name}.safetensors")
    curve = None
    if main:
        if stopped:
            final = save_adapter(final.stem)
            state_dir = save_resumable()
            print(f"stopped at step {global_step}: adapter {final}, resume with --resume {state_dir}", flush=True)
        else:
            final = save_adapter(final.stem)
            if cfg.save_state:
                save_resumable()
                rotate(output_dir, "state-*", cfg.save_last_n or 2)
            if cfg.sample_prompts:
                make_samples("final")
        loss_steps = list(range(global_step - len(losses) + 1, global_step + 1))  # losses end at global_step
        (output_dir / "loss.csv").write_text("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in zip(loss_steps, losses)))
        curve = loss_curve(loss_steps, losses, output_dir / "loss.png",
                           val_steps=[s for s, _ in val_losses], val_losses=[v for _, v in val_losses])
        print(f"saved {final}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    network.remove()
    result = TrainResult(final, output_dir, global_step, epochs_seen(), stopped, losses, val_losses, samples, saved, curve,
                         preflight_text)
    emit({"type": "done", "output": str(final) if final else None, "stopped": stopped, "step": global_step})
    return result


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text)


def oom_advice(cfg: TrainConfig, error: BaseException) -> str:
    """Out of memory: say what to change, in the order that usually helps most."""
    tips = []
    if cfg.train_batch_size > 1:
        tips.append(f"lower train_batch_size (now {cfg.train_batch_size}) and raise gradient_accumulation_steps to keep "
                    "the effective batch")
    if not cfg.gradient_checkpointing:
        tips.append("set gradient_checkpointing = true (less memory, ~20% slower)")
    if cfg.mixed_precision == "no":
        tips.append('set mixed_precision = "bf16" (or "fp16" on GPUs without bf16)')
    if not cfg.cache_latents:
        tips.append("set cache_latents = true (the VAE is not run during training)")
    if cfg.train_text_encoder:
        tips.append("train_text_encoder = false with cache_text_encoder_outputs = true")
    w, h = cfg.resolution
    tips.append(f"lower resolution / max_bucket_reso (now {w}x{h}, max {cfg.max_bucket_reso})")
    first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
    return ("out of memory (" + first_line + "). Adapters saved so far are complete. Try: " + "; ".join(tips) + ".")


def _all_reduce_grads(accelerator, params: list[torch.nn.Parameter], loss: float, stop: bool = False) -> tuple[float, bool]:
    """Average the adapter gradients over the processes in place; the loss and a stop flag ride along.
    Returns (mean loss, whether any process asked to stop)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    extra = torch.tensor([loss, float(stop)], dtype=grads[0].dtype, device=grads[0].device)
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads] + [extra]), reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    return float(flat[-2]), bool(flat[-1] > 0)


def _enable_te_checkpointing(te) -> None:
    """Non-reentrant checkpointing: the reentrant kind (transformers 4.x's default) only back-propagates into
    a checkpointed block when its input requires grad, and the frozen embeddings' output does not, so the
    LoHA factors inside would get no gradient at all."""
    kwargs = {"use_reentrant": False}
    if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5 (gradient_checkpointing_enable deprecated)
        te.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, ROCm, MPS, XPU, ...
    if acc is not None:
        return bool(acc.is_available())
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def sample_grid(pipe, network: LoHANetwork, cfg: TrainConfig, path: Path) -> Path:
    """Images from the live network (eval mode, fixed seeds) for each sample prompt, as one labelled PNG."""
    models = [m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    pipe.set_progress_bar_config(disable=True)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()  # no rank/module dropout in the samples: they show what the saved file does
    old_scheduler = pipe.scheduler
    pipe.scheduler, _ = schedulers.make_scheduler(cfg.sample_sampler, old_scheduler.config)
    w, h = cfg.sample_size
    images = []
    try:
        with torch.no_grad():
            for i, prompt in enumerate(cfg.sample_prompts):
                gen = torch.Generator().manual_seed(cfg.sample_seed + i)
                images.append(pipe(**_prompt_kwargs(pipe, cfg, prompt), num_inference_steps=cfg.sample_steps,
                                   guidance_scale=cfg.sample_guidance_scale, width=w, height=h,
                                   generator=gen).images[0])
    finally:
        pipe.scheduler = old_scheduler
        for m, mode in zip(models, was_training):
            m.train(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, labels=list(cfg.sample_prompts)).save(path)
    return path


def _prompt_kwargs(pipe, cfg: TrainConfig, prompt: str) -> dict[str, Any]:
    """The pipeline's prompt arguments, with the clip_skip the adapter was trained with.

    clip_skip 1 is the pipelines' default. Above it, SDXL takes diffusers' own clip_skip (which counts skipped
    layers: ours minus one). The SD 1.x/2.x pipeline's clip_skip path reads `text_encoder.text_model`, which
    transformers 5's CLIPTextModel no longer has, so for those the embeddings come from the trainer's own
    encoder (prompt and negative prompt both skip layers, as in A1111).
    """
    negative = cfg.sample_negative_prompt or None
    if cfg.clip_skip <= 1:
        return {"prompt": prompt, "negative_prompt": negative}
    if getattr(pipe, "text_encoder_2", None) is not None:
        return {"prompt": prompt, "negative_prompt": negative, "clip_skip": cfg.clip_skip - 1}
    encode = Conditioner(pipe, sdxl=False, clip_skip=cfg.clip_skip, train_text_encoder=False)
    device = pipe.unet.device
    return {"prompt_embeds": encode([prompt], device)["encoder_hidden_states"],
            "negative_prompt_embeds": encode([negative or ""], device)["encoder_hidden_states"]}
