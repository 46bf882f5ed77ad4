"""The run's surroundings: accelerate and processes, stop requests, running out of memory.

Kept apart from the recipe (loop.py) so the training step reads without them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import TrainConfig, tensorboard_installed

if TYPE_CHECKING:
    from accelerate.tracking import GeneralTracker
    from PIL import Image

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped for a reason the user can act on; the message says what to do."""


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps its settings in process-wide singletons that refuse a change of mixed precision; one
    # process runs several trainings (the web UI, tests), so each run starts from fresh ones. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun / accelerate launch --multi_gpu set it
    log_with = make_trackers(cfg) or None
    accelerator = Accelerator(
        # accelerate only forms a CPU process group (gloo) when told it runs on CPU; without this, processes
        # launched on a machine without an accelerator would each train alone and write the same files
        cpu=launched > 1 and not has_accelerator(),
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_dir=cfg.effective_logging_dir,
    )
    if launched > 1 and accelerator.num_processes != launched:
        raise TrainingError(f"{launched} processes were launched (WORLD_SIZE) but accelerate set up "
                            f"{accelerator.num_processes}: they would train separately and overwrite each other's files")
    if launched == 1 and accelerator.num_processes == 1 and "MASTER_PORT" in os.environ and accelerator.is_main_process:
        print("note: one training process. `accelerate launch --num_processes N` starts N processes only on N GPUs "
              "(or under mpirun); on CPU use `accelerate launch --multi_gpu --num_processes N ...`", flush=True)
    return accelerator


#: the trackers each log_with value stands for (auto: TensorBoard when installed)
TRACKERS: dict[str, tuple[str, ...]] = {
    "auto": ("tensorboard",), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb"),
    "none": (),
}


def make_trackers(cfg: TrainConfig) -> list[GeneralTracker]:
    """accelerate's trackers for log_with, built here so that they get the run's names and folder (accelerate's
    init_trackers starts them with the config): TensorBoard in logging_dir/log_tracker_name, wandb's run files
    under logging_dir instead of the current folder."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    names = TRACKERS[cfg.log_with]
    if cfg.log_with == "auto" and not tensorboard_installed():
        names = ()
    logging_dir = cfg.effective_logging_dir
    trackers: list[GeneralTracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(cfg.log_tracker_name, logging_dir))
        else:
            Path(logging_dir).mkdir(parents=True, exist_ok=True)
            trackers.append(WandBTracker(cfg.log_tracker_name, dir=logging_dir, name=cfg.wandb_run_name))
    return trackers


def lr_scalars(lr_scheduler: Any, optimizer: Any) -> dict[str, float]:
    """The learning rates of a step as kohya logs them: lr/<group> per parameter group (its "name", else groupN),
    lr/d*lr/<group> for optimizers that adapt a step size d (Prodigy, D-Adaptation), and lr (the first group)."""
    lrs = [float(x) for x in lr_scheduler.get_last_lr()]
    out = {"lr": lrs[0]}
    for i, (lr, group) in enumerate(zip(lrs, optimizer.param_groups)):
        name = group.get("name") or f"group{i}"
        out[f"lr/{name}"] = lr
        if "d" in group:
            out[f"lr/d*lr/{name}"] = float(group["d"]) * float(group["lr"])
    return out


def log_image(accelerator: Any, key: str, image: Image.Image, step: int) -> None:
    """One picture (a sample grid) in every tracker of the run, at `step`."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({key: [image]}, step=step)


def ensure_loss_scaler(accelerator, mixed_precision: str) -> bool:
    """fp16 gradients underflow without loss scaling. accelerate creates a GradScaler only on CUDA; elsewhere
    (the CPU) we give it one, so fp16 runs take the same path everywhere, resume included. Returns True
    when the scaler is ours (accelerate then does not unscale before clipping: the caller must)."""
    if mixed_precision != "fp16" or accelerator.scaler is not None:
        return False
    accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    return True


def all_reduce_grads(accelerator, params: list[torch.nn.Parameter], loss: float, stop: bool = False) -> tuple[float, bool]:
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


def enable_te_checkpointing(te) -> None:
    """Non-reentrant checkpointing: the reentrant kind (transformers 4.x's default) only back-propagates into
    a checkpointed block when its input requires grad, and the frozen embeddings' output does not, so the
    LoHA factors inside would get no gradient at all."""
    kwargs = {"use_reentrant": False}
    if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5 (gradient_checkpointing_enable deprecated)
        te.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, ROCm, MPS, XPU, ...
    if acc is not None:
        return bool(acc.is_available())
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


class StopFlag:
    """Set by the web UI's Stop button (a threading.Event) or by SIGINT/SIGTERM."""

    def __init__(self, event: threading.Event | None) -> None:
        self.event = event
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # second Ctrl-C: give up on saving
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning(
            "stop requested: saving the adapter and resumable state after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def is_set(self) -> bool:
        return self.signal is not None or (self.event is not None and self.event.is_set())


# torch.OutOfMemoryError is torch >= 2.5; torch.cuda's name for the same class is older.
_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    {t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None), MemoryError)
     if t is not None})


def is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, _OOM_TYPES) or "out of memory" in text or "can't allocate memory" in text


def oom_advice(cfg: TrainConfig, error: BaseException, estimate: Any = None) -> str:
    """Out of memory: say what to change, in the order that usually helps most; with the run's memory estimate
    (sd_loha.train.memory.MemoryEstimate, when it was made), what it said the run needs and its measured options."""
    tips = []
    if estimate is not None and estimate.suggestions:
        tips += [f"{change} (estimated {total / 2 ** 30:.1f} GiB in all)" for change, total in estimate.suggestions]
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
    elif not cfg.cache_text_encoder_outputs:
        tips.append("cache_text_encoder_outputs = true (the frozen text encoders then wait on the CPU)")
    if not cfg.fp8_base and cfg.base_weight_dtype == "auto":
        tips.append('set fp8_base = true (the frozen weights in fp8: half their memory), or base_weight_dtype = "nf4"')
    elif cfg.base_weight_dtype != "nf4":
        tips.append('base_weight_dtype = "nf4" (the frozen Linear weights in 4 bits)')
    w, h = cfg.resolution
    tips.append(f"lower resolution / max_bucket_reso (now {w}x{h}, max {cfg.max_bucket_reso})")
    if estimate is not None and estimate.suggestions:  # the measured form of a tip replaces its plain one
        named = {change.split(" =")[0] for change, _ in estimate.suggestions}
        tips = tips[:len(estimate.suggestions)] + [t for t in tips[len(estimate.suggestions):]
                                                   if not any(n in t for n in named)]
    first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
    need = "" if estimate is None else f" The estimate before the first step was {estimate.total / 2 ** 30:.1f} GiB."
    return ("out of memory (" + first_line + ")." + need + " Adapters saved so far are complete. Try: "
            + "; ".join(tips) + ".")
