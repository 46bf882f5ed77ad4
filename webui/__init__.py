"""The sd-loha web UI (Gradio): `sd-loha webui` or `python -m webui`. See docs/webui.md.

The UI holds no training or loading logic of its own: it calls sd_loha.train.loop.train,
sd_loha.data.preflight.run_preflight, sd_loha.generate.GenerationSession and sd_loha.inspect.summarize.
"""

from .paths import PathPolicy, PathRefused

__all__ = ["PathPolicy", "PathRefused", "build_app", "launch"]


def build_app(*args, **kwargs):
    from .app import build_app as _build

    return _build(*args, **kwargs)


def launch(*args, **kwargs):
    from .app import launch as _launch

    return _launch(*args, **kwargs)
