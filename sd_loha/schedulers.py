"""The samplers (diffusers schedulers) that generation and training samples can use, under one set of names.

Names follow A1111's sampler list; kohya's sample_sampler spellings (k_euler_a, dpmsolver++, ...) are
accepted as aliases, so configs written for sd-scripts keep working.
"""

from __future__ import annotations

from typing import Any

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


def make_scheduler(name: str, config: Any) -> tuple[Any, str]:
    """(a diffusers scheduler built from a pipeline's scheduler `config`, A1111's label for it)."""
    import diffusers

    cls_name, extra, label = SCHEDULERS[resolve(name)]
    return getattr(diffusers, cls_name).from_config(config, **extra), label
