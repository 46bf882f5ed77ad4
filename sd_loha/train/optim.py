"""Optimizers by name (kohya sd-scripts' names, any torch.optim class, or an import path) and diffusers' LR schedulers.

One table, :data:`KNOWN_OPTIMIZERS`, says where each of kohya's extra names lives. :func:`resolve_optimizer`
turns a name into a class (importing its package) and :func:`check_optimizer_args` tries the arguments on it;
the config calls both while it validates, before any model loads, and :func:`make_optimizer` uses the same
resolution, so a name the config accepted is the class the run gets.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "KNOWN_OPTIMIZERS",
    "OptimizerError",
    "ResolvedOptimizer",
    "check_optimizer_args",
    "make_optimizer",
    "make_scheduler",
    "optimizer_names",
    "resolve_optimizer",
]


class OptimizerError(ValueError):
    """A name that resolves to no usable optimizer, or arguments it refuses; ``fix`` says what to do."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message + (f"; {fix}" if fix else ""))
        self.message = message
        self.fix = fix


@dataclass(frozen=True)
class _Source:
    module: str
    attr: str
    pip: str  # what to pip install when the module is missing


#: kohya sd-scripts' optimizer names that are not torch.optim classes (matched case-insensitively) -> the class
KNOWN_OPTIMIZERS: dict[str, _Source] = {
    "AdamW8bit": _Source("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "PagedAdamW8bit": _Source("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    "PagedAdamW": _Source("bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
    "PagedAdamW32bit": _Source("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"),
    "Lion8bit": _Source("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "PagedLion8bit": _Source("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
    "Lion": _Source("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": _Source("prodigyopt", "Prodigy", "prodigyopt"),
}

#: torch.optim classes that a diffusion training loop cannot drive, and why
_REFUSED_TORCH: dict[str, str] = {
    "Optimizer": "it is the abstract base class",
    "LBFGS": "it needs a closure that re-evaluates the loss, which a diffusion training loop cannot provide",
    "SparseAdam": "it only works with sparse gradients",
}

#: arguments the trainer passes itself
_RESERVED_ARGS: dict[str, str] = {
    "params": "the trainer passes the LoHA parameters itself",
    "lr": "set learning_rate (and unet_lr / text_encoder_lr) instead",
}

_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


@dataclass(frozen=True)
class ResolvedOptimizer:
    name: str  # canonical spelling: what the config stores
    cls: type[torch.optim.Optimizer]


@functools.lru_cache(maxsize=1)
def _torch_optimizers() -> dict[str, str]:
    """lower-case name -> canonical name of every torch.optim optimizer class."""
    return {n.lower(): n for n in dir(torch.optim) if _is_optimizer_class(getattr(torch.optim, n))}


def _is_optimizer_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)


def optimizer_names() -> list[str]:
    """Every name :func:`resolve_optimizer` accepts without an import path (for UIs and suggestions)."""
    torch_names = [n for n in _torch_optimizers().values() if n not in _REFUSED_TORCH]
    return list(KNOWN_OPTIMIZERS) + [n for n in torch_names if n not in KNOWN_OPTIMIZERS]


def _close(word: str, pool: list[str]) -> str | None:
    lower = {p.lower(): p for p in pool}
    hit = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
    return lower[hit[0]] if hit else None


def _import(module: str, what: str, pip: str | None) -> Any:
    """Import ``module`` for optimizer_type ``what``; ``pip`` is the package to install when it is missing."""
    top = module.split(".")[0]
    try:
        importlib.import_module(top)  # first, so that a package that is not there is told apart from a broken one
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != top:
            error: Exception = e  # the package is there, a part of it or one of its dependencies is not
        elif pip is not None:
            raise OptimizerError(f"optimizer_type {what!r} needs the package {pip!r}, which is not installed",
                                 f"install it (pip install {pip}) or use optimizer_type = \"AdamW\"") from None
        else:
            raise OptimizerError(f"optimizer_type {what!r}: there is no module {top!r}",
                                 f"install the package that provides it (often pip install {top}), or check the "
                                 "spelling of the import path") from None
    except Exception as e:  # noqa: BLE001 - an installed package that fails to import (CUDA libraries, versions)
        error = e
    raise OptimizerError(f"optimizer_type {what!r}: importing {module} failed: {type(error).__name__}: {error}",
                         "reinstall that package, or use optimizer_type = \"AdamW\"")


def _from_import_path(path: str) -> ResolvedOptimizer:
    module, _, attr = path.rpartition(".")
    mod = _import(module, path, None)
    obj = getattr(mod, attr, None)
    if obj is None:
        pool = [n for n in dir(mod) if _is_optimizer_class(getattr(mod, n, None)) and n not in _REFUSED_TORCH]
        hint = _close(attr, pool)
        msg = f"optimizer_type {path!r}: {module} has no {attr!r}" + (f" (did you mean '{module}.{hint}'?)" if hint else "")
        raise OptimizerError(msg, f"its optimizer classes: {', '.join(pool)}" if pool and not hint else None)
    if not _is_optimizer_class(obj):
        raise OptimizerError(f"optimizer_type {path!r} is not an optimizer class (a torch.optim.Optimizer subclass)",
                             "give the import path of the class itself, e.g. 'torch.optim.RAdam'")
    return ResolvedOptimizer(path, obj)


def resolve_optimizer(name: str) -> ResolvedOptimizer:
    """The optimizer class a config's ``optimizer_type`` names, its package imported; raises OptimizerError.

    Names: kohya's (AdamW8bit, PagedAdamW8bit, Lion8bit, Prodigy, ...; see KNOWN_OPTIMIZERS) and torch.optim
    class names, case-insensitively, or an import path ``module.Class`` (case-sensitive, as Python is)."""
    name = name.strip()
    if _IMPORT_PATH.fullmatch(name):
        return _from_import_path(name)
    low = name.lower()
    for known, src in KNOWN_OPTIMIZERS.items():
        if known.lower() == low:
            cls = getattr(_import(src.module, known, src.pip), src.attr)
            return ResolvedOptimizer(known, cls)
    canon = _torch_optimizers().get(low)
    if canon is None:
        hint = _close(name, optimizer_names())
        msg = f"optimizer_type {name!r} is not one of kohya's names (AdamW8bit, Prodigy, ...) or a torch.optim optimizer"
        raise OptimizerError(msg + (f" (did you mean {hint!r}?)" if hint else ""),
                             "for an optimizer from another package write its import path, e.g. 'torch.optim.RAdam' "
                             "or 'bitsandbytes.optim.PagedAdamW8bit'")
    if canon in _REFUSED_TORCH:
        raise OptimizerError(f"optimizer_type {canon!r} cannot be used: {_REFUSED_TORCH[canon]}",
                             "use AdamW, AdamW8bit or Prodigy")
    return ResolvedOptimizer(canon, getattr(torch.optim, canon))


def _accepted_args(cls: type) -> list[str] | None:
    """Keyword arguments of the class's constructor, or None when it takes **kwargs (anything goes)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "params"]


def check_optimizer_args(opt: ResolvedOptimizer, args: dict[str, Any], lr: float) -> None:
    """Refuse arguments the class does not take or rejects, naming the key; raises OptimizerError.

    Cheap: the signature, then one construction on a dummy parameter (a matrix, like the LoHA factors), which
    catches bad values (betas out of range, ...) the way the real construction would, only before any model loads."""
    for key, why in _RESERVED_ARGS.items():
        if key in args:
            raise OptimizerError(f"optimizer_args: '{key}' cannot be given", why)
    accepted = _accepted_args(opt.cls)
    if accepted is not None:
        for key in args:
            if key not in accepted:
                hint = _close(key, accepted)
                msg = f"optimizer_args: '{key}' is not an argument of optimizer_type {opt.name!r}"
                raise OptimizerError(msg + (f" (did you mean '{hint}'?)" if hint else ""),
                                     f"its arguments: {', '.join(a for a in accepted if a != 'lr')}")
    try:
        opt.cls([torch.nn.Parameter(torch.zeros(2, 2))], lr=lr, **args)
    except (TypeError, ValueError) as e:
        raise OptimizerError(f"optimizer_args {args!r} refused by optimizer_type {opt.name!r}: {e}",
                             "fix or remove the argument it names") from None


def make_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, args: dict[str, Any] | None = None,
                   *, fused_ok: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``name`` resolves to (see :func:`resolve_optimizer`) over ``param_groups``."""
    opt = resolve_optimizer(name)
    args = dict(args or {})
    if fused_ok and opt.cls in (torch.optim.AdamW, torch.optim.Adam) and "fused" not in args:
        args["fused"] = True  # one kernel per step on CUDA instead of a loop over parameters
    return opt.cls(param_groups, lr=lr, **args)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                   num_cycles: int = 1, power: float = 1.0):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
