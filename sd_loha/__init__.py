"""sd-loha: train LoHA adapters for Stable Diffusion and load any LoHA file into diffusers pipelines.

    import sd_loha
    report = sd_loha.apply_loha(pipe, "style.safetensors", strength=0.8)
    sd_loha.set_loha_strength(pipe, "style", 0.5)
    sd_loha.remove_loha(pipe)            # original weights back, bit for bit
"""

from .formats import load_adapter
from .io import AdapterFileError
from .merge import ApplyReport, ArchitectureMismatchError, apply_loha, list_loha, remove_loha, set_loha_strength
from .model_names import UnsupportedWeightError
from .models import build_tiny_pipeline, detect_family, load_pipeline
from .network import LoHANetwork, add_loha, save_loha
from .version import __version__

__all__ = [
    "AdapterFileError", "ApplyReport", "ArchitectureMismatchError", "LoHANetwork", "add_loha", "apply_loha",
    "build_tiny_pipeline", "detect_family", "list_loha", "load_adapter", "load_pipeline", "remove_loha",
    "save_loha", "set_loha_strength", "UnsupportedWeightError", "__version__",
]
