"""The samplers (diffusers schedulers) that generation and training samples can use, under one set of names.

Names follow A1111's sampler list; kohya's sample_sampler spellings (k_euler_a, dpmsolver++, ...) are
accepted as aliases, so configs written for sd-scripts keep working.

A flow-matching pipeline (SD 3.x: a transformer predicting the flow, scheduled by FlowMatchEulerDiscreteScheduler)
takes only the samplers of :data:`FLOW_SCHEDULERS`, which integrate a flow (the others integrate a noise
prediction and would draw noise); :func:`make_scheduler` refuses the rest by name.
"""

from __future__ import annotations

from typing import Any

from .version import diffusers_at_least

#: DPM-Solver's flow prediction (its SD 3.x form) came in diffusers 0.33
FLOW_SAMPLERS_DIFFUSERS = (0, 33)

#: name -> (diffusers scheduler class, extra from_config arguments, A1111's label for the PNG parameters)
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm_2": ("KDPM2DiscreteScheduler", {}, "DPM2"),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
                        "DPM++ 2M Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}

#: the samplers of a flow-matching pipeline (SD 3.x): name -> (diffusers scheduler class, extra from_config
#: arguments, A1111 / Forge label). Each keeps the pipeline scheduler's `shift` (DPM++ reads it as `flow_shift`).
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}, "Heun"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "use_flow_sigmas": True, "prediction_type": "flow_prediction"},
                 "DPM++ 2M"),
}

#: other spellings (kohya sd-scripts, diffusers examples) -> name
ALIASES: dict[str, str] = {
    "k_euler_a": "euler_a",
    "k_euler": "euler",
    "k_lms": "lms",
    "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_a",
    "dpmsolver++": "dpmpp_2m",
    "dpmsolver++_karras": "dpmpp_2m_karras",
    "dpm++_2m": "dpmpp_2m",
    "dpm++_2m_karras": "dpmpp_2m_karras",
}


#: what a sampler needs beyond diffusers: name -> (package it imports, fewest inference steps it runs)
REQUIREMENTS: dict[str, tuple[str | None, int]] = {
    "lms": ("scipy", 1),  # LMSDiscreteScheduler integrates its coefficients with scipy
    "pndm": (None, 4),  # PLMS needs 4 steps of warm-up history; fewer fail inside diffusers' set_timesteps
}


def sampler_problem(name: str, steps: int) -> tuple[str, str] | None:
    """(what is wrong, what to do) when sampler `name` cannot run `steps` steps here; None when it can."""
    import importlib.util

    key = resolve(name)
    package, min_steps = REQUIREMENTS.get(key, (None, 1))
    if package and importlib.util.find_spec(package) is None:
        return (f"sampler {key!r} needs the package {package!r}, which is not installed",
                f"pip install {package}, or choose another sampler (e.g. euler_a)")
    if steps < min_steps:
        return (f"sampler {key!r} needs at least {min_steps} steps, got {steps}",
                f"use {min_steps} or more steps, or another sampler (e.g. euler_a)")
    return None


def resolve(name: str) -> str:
    """The canonical name for `name` (an alias or a name, any case); ValueError listing the names if unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return key


def is_flow_config(config: Any) -> bool:
    """Whether a pipeline's scheduler config is a flow-matching one (SD 3.x's FlowMatchEulerDiscreteScheduler): its
    class name where the config was read from a folder, else the `shift` only the flow-matching schedulers have
    (DPM-Solver and UniPC name theirs `flow_shift`, and have dynamic shifting too)."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    name = str(get("_class_name", "") or "")
    return name.startswith("FlowMatch") if name else get("shift") is not None


def default_sampler(config: Any) -> str:
    """The sampler generation uses when none is given: A1111's default (Euler a) on the UNet families, the flow
    Euler SD 3.x ships with on a flow-matching pipeline."""
    return "euler" if is_flow_config(config) else "euler_a"


def flow_problem(name: str) -> str | None:
    """Why sampler `name` cannot run a flow-matching (SD 3.x) pipeline, or None when it can."""
    key = resolve(name)
    if key in FLOW_SCHEDULERS:
        return None
    return (f"sampler {key!r} integrates a noise prediction and cannot sample an SD 3.x (flow-matching) model; "
            f"choose one of {', '.join(FLOW_SCHEDULERS)}")


def make_scheduler(name: str, config: Any) -> tuple[Any, str]:
    """(a diffusers scheduler built from a pipeline's scheduler `config`, A1111's label for it). A flow-matching
    config (SD 3.x) takes the samplers of FLOW_SCHEDULERS, with its own shift; ValueError for any other."""
    import diffusers

    key = resolve(name)
    if not is_flow_config(config):
        cls_name, extra, label = SCHEDULERS[key]
        return getattr(diffusers, cls_name).from_config(config, **extra), label
    problem = flow_problem(key)
    if problem:
        raise ValueError(problem)
    cls_name, extra, label = FLOW_SCHEDULERS[key]
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    shift = {"flow_shift": float(get("shift", 1.0))} if cls_name == "DPMSolverMultistepScheduler" else {}
    if extra.get("prediction_type") == "flow_prediction" and not diffusers_at_least(FLOW_SAMPLERS_DIFFUSERS):
        raise ValueError(f"sampler {key!r} on an SD 3.x model needs diffusers 0.33 or newer (flow prediction in "
                         f'{cls_name}): pip install -U "diffusers>=0.33", or choose euler or heun')
    return getattr(diffusers, cls_name).from_config(config, **extra, **shift), label
