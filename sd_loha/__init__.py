"""sd-loha: train LoHA adapters for Stable Diffusion and load any LoHA file into diffusers pipelines."""

__version__ = "0.1.0"
