"""Optimizers by name (kohya's names plus any torch.optim class) and diffusers' LR schedulers."""

from __future__ import annotations

import difflib
import importlib.util
from typing import Any

import torch


class OptimizerError(ValueError):
    pass


def make_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, args: dict[str, Any] | None = None,
                   *, fused_ok: bool = False) -> torch.optim.Optimizer:
    args = dict(args or {})
    low = name.lower()
    if low in ("adamw8bit", "adamw_8bit"):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise OptimizerError("optimizer_type AdamW8bit needs bitsandbytes: pip install bitsandbytes "
                                 "(CUDA only), or use optimizer_type = \"AdamW\"")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, lr=lr, **args)
    if low == "prodigy":
        if importlib.util.find_spec("prodigyopt") is None:
            raise OptimizerError("optimizer_type Prodigy needs prodigyopt: pip install prodigyopt")
        from prodigyopt import Prodigy

        return Prodigy(param_groups, lr=lr, **args)
    classes = {n.lower(): n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
               and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)}
    if low not in classes:
        close = difflib.get_close_matches(low, list(classes) + ["adamw8bit", "prodigy"], n=1)
        hint = f" (did you mean {classes.get(close[0], close[0])!r}?)" if close else ""
        raise OptimizerError(f"optimizer_type {name!r} is not AdamW8bit, Prodigy or a torch.optim class{hint}")
    cls = getattr(torch.optim, classes[low])
    if fused_ok and classes[low] in ("AdamW", "Adam") and "fused" not in args:
        args["fused"] = True  # one kernel per step on CUDA instead of a loop over parameters
    return cls(param_groups, lr=lr, **args)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                   num_cycles: int = 1, power: float = 1.0):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
