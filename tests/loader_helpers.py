"""Shared helpers for the loader tests (test_merge, test_io, test_inspect_cli, test_generate).

Adapter files are made the way users get them: add_loha on a tiny pipeline, factors randomised (LyCORIS
initialises w2_a to 0, which would make every delta zero), network.save, network.remove. Odd cases are
written as state dicts by hand.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sd_loha import add_loha
from sd_loha.models import text_encoders
from sd_loha.ops import loha_delta, lora_delta


def randomize(params, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_loha_file(pipe, path: Path, *, seed: int = 0, std: float = 0.2, dtype=torch.float32,
                   metadata: dict | None = None, **kwargs) -> dict:
    """Write a LoHA file for `pipe` (which is left as it was) and return the network's listing rows."""
    settings = dict(preset="full", rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5)
    settings.update(kwargs)
    network = add_loha(pipe, **settings)
    randomize(network.parameters(), seed, std)
    network.save(path, dtype=dtype, metadata=metadata)
    rows = network.listing()
    network.remove()
    return rows


def all_models(pipe) -> dict[str, nn.Module]:
    unet = getattr(pipe, "unet", None)
    models = {"unet": unet} if unet is not None else {"transformer": pipe.transformer}
    models.update(text_encoders(pipe))
    if getattr(pipe, "vae", None) is not None:
        models["vae"] = pipe.vae
    return models


def snapshot(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of UNet, text encoder(s) and VAE, cloned."""
    out = {}
    for part, model in all_models(pipe).items():
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            out[f"{part}:{n}"] = t.detach().clone()
    return out


def changed(pipe, snap: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that are not bit-identical (torch.equal) to the snapshot."""
    now = snapshot(pipe)
    assert now.keys() == snap.keys()
    return [k for k in snap if not (now[k].dtype == snap[k].dtype and torch.equal(now[k], snap[k]))]


def assert_unchanged(pipe, snap) -> None:
    diff = changed(pipe, snap)
    assert not diff, f"{len(diff)} tensors changed, e.g. {diff[:5]}"


def file_delta(tensors: dict[str, torch.Tensor], shape, *, alpha=None, scale=None) -> torch.Tensor:
    """ΔW (fp32) of one module from its file tensors, by the FORMAT.md formulas."""
    params = {k.split(".", 1)[1]: v for k, v in tensors.items()}
    if "hada_w1_a" in params:
        r = params["hada_w1_b"].shape[0]
    else:
        r = params["lora_down.weight"].shape[0]
    if scale is None:
        a = params.get("alpha")
        scale = 1.0 if a is None else float(a) / r
    if "hada_w1_a" in params:
        return loha_delta(params, shape, scale)
    return lora_delta(params["lora_up.weight"], params["lora_down.weight"], params.get("lora_mid.weight"),
                      shape=shape, scale=scale)


def group_modules(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        out.setdefault(k.split(".", 1)[0], {})[k] = v
    return out


def quantize_unet_linears(unet: nn.Module, bits: int) -> int:
    """Replace every Linear of `unet` by a bitsandbytes Linear4bit (NF4) or Linear8bitLt (LLM.int8), quantized on
    the CPU, as diffusers' BitsAndBytesConfig does on a GPU."""
    import bitsandbytes as bnb

    n = 0
    for path, module in list(unet.named_modules()):
        if type(module) is not nn.Linear:
            continue
        data = module.weight.data.clone()
        if bits == 4:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                    has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        parent, _, attr = path.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, attr, q.to("cpu"))  # .to() quantizes
        n += 1
    return n
