"""Text conditioning for training: prompts -> the denoiser's encoder_hidden_states (and each family's extras).

Matches what the diffusers pipelines feed the denoiser at inference, so an adapter trained here sees the
same conditioning it will get when loaded: SD1/SD2 use the last hidden state (or an earlier layer with
clip_skip, re-normalised like A1111), SDXL concatenates both encoders' penultimate hidden states and
adds the pooled CLIP-G embedding and the size/crop micro-conditioning; SD 3.x joins CLIP-L's and CLIP-G's
penultimate states (padded to T5's width) and T5-XXL's last state along the sequence, with both CLIPs' pooled
embeddings as pooled_projections (StableDiffusion3Pipeline.encode_prompt).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


def tokenize(tokenizer: Any, captions: Sequence[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded (and truncated) to ``max_length`` (the tokenizer's model_max_length by default)."""
    max_len = max_length or tokenizer.model_max_length
    ids = tokenizer(list(captions), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
    return ids


def caption_too_long(tokenizer: Any, caption: str) -> bool:
    return len(tokenizer(caption, truncation=False).input_ids) > tokenizer.model_max_length


def encode_sd(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    final_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
    return final_norm(hidden)


def _clip_states(text_encoders: Sequence[Any], input_ids: Sequence[torch.Tensor],
                 clip_skip: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each CLIP's hidden states (SDXL's and SD 3.x's penultimate layer; clip_skip counts further back from there,
    diffusers' convention) and its pooled, projected embedding (CLIPTextModelWithProjection's text_embeds)."""
    states, pooled = [], []
    for te, ids in zip(text_encoders, input_ids):
        out = te(ids, output_hidden_states=True)
        states.append(out.hidden_states[-(clip_skip + 1)])
        pooled.append(out[0])
    return states, pooled


def encode_sdxl(text_encoders: Sequence[Any], input_ids: Sequence[torch.Tensor], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) as StableDiffusionXLPipeline.encode_prompt builds them: the pooled embedding is the
    last encoder's (CLIP-G)."""
    states, pooled = _clip_states(text_encoders, input_ids, clip_skip)
    return torch.cat(states, dim=-1), pooled[-1]


def sdxl_time_ids(original_size: Sequence[Sequence[int]], crop_top_left: Sequence[Sequence[int]],
                  target_size: Sequence[Sequence[int]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample (orig_h, orig_w, crop_top, crop_left, target_h, target_w), the micro-conditioning SDXL was trained with."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_size, crop_top_left, target_size)]
    return torch.tensor(rows, device=device, dtype=dtype)


class Conditioner:
    """Encodes a batch of captions for one pipeline family; knows whether the text encoders train."""

    def __init__(self, pipe: Any, *, sdxl: bool, clip_skip: int, train_text_encoder: bool) -> None:
        self.sdxl = sdxl
        self.clip_skip = clip_skip
        self.train_text_encoder = train_text_encoder
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else [])
        self.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
        #: the outputs that come from the text encoders (what a text cache holds), in order
        self.keys: tuple[str, ...] = ("encoder_hidden_states", "text_embeds") if sdxl else ("encoder_hidden_states",)

    def __call__(self, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        ids = [tokenize(t, captions).to(device) for t in self.tokenizers]
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            if self.sdxl:
                embeds, pooled = encode_sdxl(self.text_encoders, ids, self.clip_skip)
                return {"encoder_hidden_states": embeds, "text_embeds": pooled}
            return {"encoder_hidden_states": encode_sd(self.text_encoders[0], ids[0], self.clip_skip)}


def encode_sd3(clip_encoders: Sequence[Any], clip_ids: Sequence[torch.Tensor], clip_skip: int = 1,
               t5_embeds: torch.Tensor | None = None, *, t5_length: int = 256,
               joint_width: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_projections) as StableDiffusion3Pipeline.encode_prompt builds them from the CLIPs and
    T5's last hidden state ``t5_embeds``; without it T5's part is zeros (t5_length x joint_width), as the pipeline
    does without text_encoder_3."""
    states, pooled_parts = _clip_states(clip_encoders, clip_ids, clip_skip)
    clip, pooled = torch.cat(states, dim=-1), torch.cat(pooled_parts, dim=-1)
    dtype = clip_encoders[0].dtype  # the pipeline's choice: everything in CLIP-L's dtype
    if t5_embeds is None:
        t5_embeds = torch.zeros(clip.shape[0], t5_length, joint_width, device=clip.device, dtype=dtype)
    t5_embeds = t5_embeds.to(clip.device, dtype)
    clip = torch.nn.functional.pad(clip.to(dtype), (0, t5_embeds.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_embeds], dim=-2), pooled.to(dtype)


class SD3Conditioner:
    """Encodes a batch of captions for an SD 3.x pipeline: CLIP-L, CLIP-G and (while the pipeline has it) T5-XXL
    at ``t5_length`` tokens. The CLIPs run with gradients when ``train_text_encoder``, T5 when ``train_t5`` too.
    ``t5_cache``: where T5's outputs come from instead of running it (captions -> (batch, t5_length, width)), set
    when T5 is frozen and its outputs are cached while the CLIPs train."""

    keys: tuple[str, ...] = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, pipe: Any, *, clip_skip: int, train_text_encoder: bool, train_t5: bool = False,
                 t5_length: int = 256) -> None:
        self.pipe, self.clip_skip, self.t5_length = pipe, clip_skip, t5_length
        self.train_text_encoder, self.train_t5 = train_text_encoder, train_t5 and train_text_encoder
        self.joint_width = pipe.transformer.config.joint_attention_dim
        self.t5_cache: Callable[[list[str]], torch.Tensor] | None = None

    def encode_t5(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        """T5-XXL's last hidden state, with gradients only when T5 trains."""
        ids = tokenize(self.pipe.tokenizer_3, captions, self.t5_length).to(device)
        with torch.set_grad_enabled(self.train_t5 and torch.is_grad_enabled()):
            return self.pipe.text_encoder_3(ids)[0]

    def __call__(self, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        t5_embeds = None
        if pipe.text_encoder_3 is not None:
            t5_embeds = (self.t5_cache(list(captions)) if self.t5_cache is not None
                         else self.encode_t5(captions, device))
        clip_ids = [tokenize(t, captions).to(device) for t in (pipe.tokenizer, pipe.tokenizer_2)]
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            embeds, pooled = encode_sd3([pipe.text_encoder, pipe.text_encoder_2], clip_ids, self.clip_skip, t5_embeds,
                                        t5_length=self.t5_length, joint_width=self.joint_width)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def make_conditioner(pipe: Any, family: str, cfg: Any) -> Conditioner | SD3Conditioner:
    """The conditioner of a model family (ModelFamily.name) with the config's clip_skip and text-encoder
    settings."""
    if family == "sd3":
        return SD3Conditioner(pipe, clip_skip=cfg.clip_skip, train_text_encoder=cfg.train_text_encoder,
                              train_t5=cfg.train_t5xxl, t5_length=cfg.t5xxl_max_token_length)
    return Conditioner(pipe, sdxl=family == "sdxl", clip_skip=cfg.clip_skip, train_text_encoder=cfg.train_text_encoder)
