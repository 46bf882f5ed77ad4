"""Text conditioning for training: prompts -> the UNet's encoder_hidden_states (and SDXL's extras).

Matches what the diffusers pipelines feed the UNet at inference, so an adapter trained here sees the
same conditioning it will get when loaded: SD1/SD2 use the last hidden state (or an earlier layer with
clip_skip, re-normalised like A1111), SDXL concatenates both encoders' penultimate hidden states and
adds the pooled CLIP-G embedding and the size/crop micro-conditioning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    max_len = tokenizer.model_max_length
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


def encode_sdxl(text_encoders: Sequence[Any], input_ids: Sequence[torch.Tensor], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) as StableDiffusionXLPipeline.encode_prompt builds them."""
    embeds, pooled = [], None
    for te, ids in zip(text_encoders, input_ids):
        out = te(ids, output_hidden_states=True)
        # SDXL reads the penultimate layer; clip_skip counts further back from there (diffusers' convention).
        embeds.append(out.hidden_states[-(clip_skip + 1)])
        pooled = out[0]  # CLIPTextModelWithProjection's text_embeds (the last encoder is CLIP-G)
    return torch.cat(embeds, dim=-1), pooled


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

    def __call__(self, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        ids = [tokenize(t, captions).to(device) for t in self.tokenizers]
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            if self.sdxl:
                embeds, pooled = encode_sdxl(self.text_encoders, ids, self.clip_skip)
                return {"encoder_hidden_states": embeds, "text_embeds": pooled}
            return {"encoder_hidden_states": encode_sd(self.text_encoders[0], ids[0], self.clip_skip)}
