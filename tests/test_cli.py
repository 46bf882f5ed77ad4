"""The `sd-loha` command line itself: error messages, -v on either side of the subcommand, generate's defaults."""

from __future__ import annotations

import pytest
import torch

from sd_loha.cli import main
from sd_loha.toy.evaluate import GUIDANCE  # toy-sd1's model card: it draws best at this guidance


def test_key_errors_print_their_message_not_its_repr(monkeypatch, capsys):
    import sd_loha.inspect

    def missing(*_a, **_k):
        raise KeyError("no adapter named 'style' is loaded; loaded: none")

    monkeypatch.setattr(sd_loha.inspect, "summarize", missing)
    assert main(["inspect", "whatever.safetensors"]) == 2
    assert capsys.readouterr().err == "error: no adapter named 'style' is loaded; loaded: none\n"


@pytest.mark.parametrize("argv", [["-v", "merge"], ["merge", "-v"], ["merge", "--verbose"]])
def test_verbose_before_or_after_the_subcommand(argv, tmp_path, capsys):
    """-v is accepted on both sides (it used to be refused after the subcommand) and prints the traceback."""
    code = main([*argv, "--model", "tiny-sd1", "--loha", str(tmp_path / "missing.safetensors"),
                 "--out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "no such file" in err and "Traceback" in err


def test_without_verbose_no_traceback(tmp_path, capsys):
    assert main(["merge", "--model", "tiny-sd1", "--loha", str(tmp_path / "m.safetensors"), "--out",
                 str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


@pytest.mark.parametrize("args, guidance", [([], GUIDANCE), (["--model", "toy-sd1"], GUIDANCE), (["--model", "tiny-sd1"], 7.0),
                                            (["--guidance", "5.5"], 5.5), (["--model", "tiny-sd1", "--guidance", "2"], 2.0),
                                            (["--model", "tiny-sd3"], 4.5), (["--model", "tiny-sd3", "--guidance", "2"], 2.0)])
def test_generate_guidance_default_follows_the_model(args, guidance, monkeypatch, tmp_path):
    """toy-sd1 (the default model) draws best at guidance 4, its model card's value; SD 3.x models their card's
    value by variant (tiny-sd3 is SD3.5-Medium-style: 4.5); other models default to 7."""
    import sd_loha.generate
    from sd_loha.models import ModelFamily

    seen = {}

    class Session:
        def __init__(self, model, device=None, merge=True, base_weight_dtype="auto", base_config=None):
            seen["model"] = model
            self.family = (ModelFamily("sd3", "flow", "5-medium") if model == "tiny-sd3"
                           else ModelFamily("sd1", "epsilon"))

        def set_adapters(self, specs):
            pass

        def generate(self, prompt, **kw):
            seen.update(kw)
            return []

    monkeypatch.setattr(sd_loha.generate, "GenerationSession", Session)
    assert main(["generate", "--prompt", "a red circle on a white background", "--output-dir", str(tmp_path), *args]) == 0
    assert seen["guidance_scale"] == guidance


def _record_sessions(monkeypatch) -> list:
    """The GenerationSessions the CLI makes, in order."""
    import sd_loha.generate

    sessions = []

    class Recorded(sd_loha.generate.GenerationSession):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            sessions.append(self)

    monkeypatch.setattr(sd_loha.generate, "GenerationSession", Recorded)
    return sessions


def test_generate_no_merge_adds_the_adapter_in_the_forward(tmp_path, monkeypatch):
    """--no-merge: the same picture as the merged adapter, with the UNet's stored weights untouched."""
    import numpy as np
    from PIL import Image

    import sd_loha.generate
    from sd_loha.models import load_pipeline

    from .loader_helpers import make_loha_file, snapshot

    adapter = tmp_path / "style.safetensors"
    make_loha_file(load_pipeline("tiny-sd1"), adapter, std=0.3)
    sessions = _record_sessions(monkeypatch)
    pictures = {}
    for name, extra in {"merged": [], "bypass": ["--no-merge"], "base": None}.items():
        loha = [] if extra is None else ["--loha", f"{adapter}:1"]
        out = tmp_path / name
        assert main(["generate", "--model", "tiny-sd1", *loha, "--prompt", "a red circle", "--seed", "3",
                     "--steps", "2", "--device", "cpu", "--output-dir", str(out), *(extra or [])]) == 0
        pictures[name] = np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)
        if name == "bypass":
            untouched, stored = snapshot(load_pipeline("tiny-sd1")), snapshot(sessions[-1].pipe)
            assert untouched.keys() == stored.keys()
            assert all(torch.equal(untouched[k], stored[k]) for k in untouched)
    assert np.abs(pictures["merged"] - pictures["base"]).max() > 8  # the adapter shows
    assert np.abs(pictures["bypass"] - pictures["merged"]).max() <= 1  # fp32 rounding, then 8-bit pixels


@pytest.mark.parametrize("storage", ["nf4", "fp8"])
def test_generate_on_a_low_precision_base(tmp_path, monkeypatch, storage):
    """--base-weight-dtype: the UNet and text encoder are stored as asked, the adapter shows (strength 1 differs from
    the same stored base without it), and the stored low-precision weights are never written."""
    import numpy as np
    from PIL import Image

    import sd_loha.generate
    from sd_loha.models import load_pipeline
    from sd_loha.train.lowmem import stored_as

    from .loader_helpers import make_loha_file

    if storage == "nf4":
        pytest.importorskip("bitsandbytes")
    adapter = tmp_path / "style.safetensors"
    make_loha_file(load_pipeline("tiny-sd1"), adapter, std=0.3)
    sessions = _record_sessions(monkeypatch)
    pictures = {}
    for name, loha in {"base": [], "adapter": ["--loha", f"{adapter}:1"]}.items():
        out = tmp_path / name
        assert main(["generate", "--model", "tiny-sd1", *loha, "--prompt", "a red circle", "--seed", "3", "--steps",
                     "2", "--device", "cpu", "--output-dir", str(out), "--base-weight-dtype", storage]) == 0
        pictures[name] = np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)
    pipe = sessions[-1].pipe
    kinds = {stored_as(m) for part in (pipe.unet, pipe.text_encoder) for m in part.modules()
             if type(m).__name__ in ("Linear", "Linear4bit", "Conv2d") and hasattr(m, "weight")}
    assert storage in kinds
    assert np.abs(pictures["adapter"] - pictures["base"]).max() > 8
    # against the run without the adapter (bitsandbytes repacks 4-bit weights for its CPU kernel in the first
    # forward, so both have generated once)
    low = torch.uint8 if storage == "nf4" else torch.float8_e4m3fn
    fresh = sessions[0].pipe.unet.state_dict()
    stored = {k: v for k, v in pipe.unet.state_dict().items() if v.dtype == low}
    assert stored and all(torch.equal(v.view(torch.uint8), fresh[k].view(torch.uint8)) for k, v in stored.items())


def test_generate_refuses_an_unknown_base_weight_dtype(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--base-weight-dtype", "nf2"])
    assert "nf2" in capsys.readouterr().err
