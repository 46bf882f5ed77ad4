"""Image generation with adapters merged: one session keeps a pipeline and its loaded adapters, so
changing adapters or strengths between images merges once and re-strengthens exactly, never reloads."""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic import save_image_atomic
from .blocks import parse_block_weights
from .io import short_addnet_hash
from .merge import apply_loha, list_loha, remove_loha, set_loha_strength
from .models import ModelFamily, detect_family, load_pipeline, text_encoders
from .schedulers import default_sampler, flow_problem, is_flow_config, make_scheduler, sampler_problem
from .train.lowmem import BASE_DTYPES, storage_unavailable, store_frozen_base


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to load: a file, its strengths (te_strength None = same as strength) and block weights
    (LoRA Block Weight's syntax, as text: a preset name or a comma list; see sd_loha.blocks)."""

    path: str
    strength: float = 1.0
    te_strength: float | None = None
    block_weights: str | None = None

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """`FILE`, `FILE:STRENGTH` or `FILE:UNET_STRENGTH:TE_STRENGTH` (the CLI's --loha), each optionally
        followed by `:lbw=WEIGHTS` (`:lbw=INS`, `:lbw=1,0,0,...`)."""
        head, sep, lbw = text.rpartition(":lbw=")
        if sep:
            try:
                parse_block_weights(lbw)
            except ValueError as e:
                raise ValueError(f"--loha {text!r}: {e}") from None
            return replace(cls.parse(head), block_weights=lbw.strip())
        parts = text.rsplit(":", 2)
        nums: list[float] = []
        while len(parts) > 1:
            try:
                nums.insert(0, float(parts[-1]))
            except ValueError:
                break
            parts.pop()
        path = ":".join(parts)
        if not path:
            raise ValueError(f"--loha {text!r}: no file name before the strength")
        bad = [n for n in nums if not math.isfinite(n)]
        if bad:
            raise ValueError(f"--loha {text!r}: strengths must be finite numbers")
        if not nums:
            return cls(path)
        if len(nums) == 1:
            return cls(path, nums[0])
        return cls(path, nums[0], nums[1])


def _infotext_value(value: object) -> str:
    """A field value as A1111's infotext writes it: JSON-quoted when it holds a comma, colon or newline
    (its reader would otherwise end the value there), as is otherwise."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def lora_hashes(adapters: Sequence[AdapterSpec]) -> str | None:
    """The `Lora hashes` field: `name: <addnet shorthash>` per adapter file, A1111's spelling (the name
    loses its ':' and ',' as A1111 drops them), or None when no adapter is a file on disk."""
    entries = [f"{a.name.replace(':', '').replace(',', '')}: {short_addnet_hash(a.path)}"
               for a in adapters if os.path.isfile(a.path)]
    return ", ".join(entries) or None


def lora_tag(adapter: AdapterSpec) -> str:
    """The prompt's `<lora:name:S>` tag A1111 reads back (`<lora:name:TE:UNET>` when they differ; A1111's order),
    with `:lbw=...` as LoRA Block Weight writes it when the adapter has block weights."""
    a = adapter
    strengths = f"{a.strength:g}" if a.te_strength is None else f"{a.te_strength:g}:{a.strength:g}"
    lbw = f":lbw={a.block_weights}" if a.block_weights else ""
    return f"<lora:{a.name}:{strengths}{lbw}>"


def a1111_parameters(prompt: str, negative_prompt: str, *, steps: int, sampler: str, cfg: float, seed: int,
                     width: int, height: int, model: str, adapters: Sequence[AdapterSpec]) -> str:
    """The text A1111 writes into a PNG's `parameters` chunk (and reads back with 'PNG Info')."""
    tags = "".join(f" {lora_tag(a)}" for a in adapters)
    lines = [prompt + tags]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": f"{cfg:g}", "Seed": seed, "Size": f"{width}x{height}",
              "Model": Path(model).stem if os.path.exists(model) else model, "Lora hashes": lora_hashes(adapters),
              "Version": "sd-loha"}
    lines.append(", ".join(f"{k}: {_infotext_value(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    return save_image_atomic(image, path, pnginfo=info)


def default_device() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


class GenerationSession:
    """A loaded base pipeline plus the adapters merged into it. `merge=False` adds them in the forward instead
    (apply_loha's bypass): strength changes then rewrite no weight, for sweeps over many strengths. Layers that
    cannot take a merge (a quantized or fp8 pipeline put in `self.pipe`) take the bypass either way.

    `base_weight_dtype` stores the base's denoiser (UNet, SD 3.x's transformer) and text encoders (T5 too) as the trainer's option of that name does ("fp8":
    diffusers' layerwise casting; "nf4" / "int8": bitsandbytes, quantized as they move to the device): about half
    (fp8, int8) or a third (nf4) of the weights' memory, for a GPU that cannot hold the base in fp16.
    `base_config` completes a single-file `model` (the trainer's option of that name: load_pipeline's config)."""

    def __init__(self, model: str, *, device: str | None = None, dtype: torch.dtype | None = None,
                 merge: bool = True, base_weight_dtype: str = "auto", base_config: str | None = None) -> None:
        dev, dt = default_device()
        self.model = model
        self.merge = merge
        self.device = device or dev
        self.base_weight_dtype = base_weight_dtype
        if base_weight_dtype not in BASE_DTYPES:
            raise ValueError(f"base_weight_dtype must be one of {', '.join(BASE_DTYPES)}, got {base_weight_dtype!r}")
        why = storage_unavailable(base_weight_dtype)
        if why is not None:
            raise ValueError(f"base_weight_dtype {why[0]}: {why[1]}")
        if base_weight_dtype == "auto":
            self.pipe = load_pipeline(model, device=self.device, dtype=dtype or dt, config=base_config)
        else:  # stored on the CPU, then moved: bitsandbytes quantizes on the move, never holding a full copy there
            self.pipe = load_pipeline(model, device="cpu", dtype=dtype or dt, config=base_config)
            for part in (self.denoiser, *text_encoders(self.pipe).values()):
                store_frozen_base(part, base_weight_dtype, dtype or dt)
            self.pipe.to(self.device)
        # Every sampler is built from the base's own scheduler config, never from the last sampler's
        self._scheduler_config = self.pipe.scheduler.config
        self.adapters: list[AdapterSpec] = []
        self._merged: dict[str, bool] = {}  # adapter name -> whether it was merged (else: bypass)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet, or SD 3.x's transformer."""
        unet = getattr(self.pipe, "unet", None)
        return unet if unet is not None else self.pipe.transformer

    @property
    def family(self) -> ModelFamily:
        return detect_family(self.pipe)

    @property
    def is_flow(self) -> bool:
        """A flow-matching pipeline (SD 3.x): only sd_loha.schedulers.FLOW_SCHEDULERS sample it."""
        return is_flow_config(self._scheduler_config)

    def set_adapters(self, specs: Sequence[AdapterSpec], *, merge: bool | None = None) -> None:
        """Make the adapters exactly `specs`: apply new files, re-strengthen kept ones, remove the rest. `merge`
        (default: the session's) picks merging or the bypass; an adapter applied the other way is applied again."""
        merge = self.merge if merge is None else merge
        wanted = {s.name: s for s in specs}
        if len(wanted) != len(specs):
            raise ValueError("two adapters have the same file name; rename one")
        loaded = {a.name: a for a in self.adapters}
        for name in list(list_loha(self.pipe)):
            # An adapter merged outside this session (not in self.adapters) is replaced too.
            if (name not in wanted or name not in loaded or wanted[name].path != loaded[name].path
                    or self._merged.get(name) != merge):
                remove_loha(self.pipe, name)
                self._merged.pop(name, None)
        for spec in specs:
            te = spec.strength if spec.te_strength is None else spec.te_strength
            if spec.name in list_loha(self.pipe):
                set_loha_strength(self.pipe, spec.name, unet_strength=spec.strength, text_encoder_strength=te,
                                  block_weights=spec.block_weights)
            else:
                apply_loha(self.pipe, spec.path, unet_strength=spec.strength, text_encoder_strength=te, name=spec.name,
                           block_weights=spec.block_weights, merge=merge)
                self._merged[spec.name] = merge
        self.adapters = list(specs)

    def set_scheduler(self, name: str) -> str:
        """Switch the sampler (see sd_loha.schedulers); returns its A1111 label."""
        self.pipe.scheduler, label = make_scheduler(name, self._scheduler_config)
        return label

    def generate(self, prompt: str, *, negative_prompt: str = "", seed: int = -1, steps: int = 20,
                 guidance_scale: float = 7.0, width: int | None = None, height: int | None = None,
                 scheduler: str | None = None, num_images: int = 1) -> list[tuple[Image.Image, str]]:
        """Images with their A1111-style parameter text; seed -1 picks a random seed (reported in the text).
        `scheduler` None: the model's default sampler (Euler a; SD 3.x: its flow Euler)."""
        scheduler = scheduler or default_sampler(self._scheduler_config)
        problem = sampler_problem(scheduler, steps)
        if problem:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        if self.is_flow and flow_problem(scheduler):
            raise ValueError(flow_problem(scheduler))
        label = self.set_scheduler(scheduler)
        default = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        width, height = width or default, height or default
        out = []
        for i in range(num_images):
            s = random.randrange(2**31) if seed == -1 else seed + i
            gen = torch.Generator(device="cpu").manual_seed(s)
            image = self.pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                              guidance_scale=guidance_scale, width=width, height=height, generator=gen).images[0]
            text = a1111_parameters(prompt, negative_prompt, steps=steps, sampler=label, cfg=guidance_scale, seed=s,
                                    width=width, height=height, model=self.model, adapters=self.adapters)
            out.append((image, text))
        return out
