"""Low-memory training: idle components off the training device, and an fp8 / nf4 / int8 frozen base.

Every run goes through the CLI with a shipped config, only the model, data, size and steps swapped, in bf16 (which
accelerate runs on the CPU). The Trainer the CLI builds is captured, and at the end of its run (before the network
is removed) the test reads how its frozen layers are stored and measures the loss of a fixed set of batches, at
strength 0 and 1, with the same noise and timesteps.
"""

from __future__ import annotations

import types

import pytest
import torch

import sd_loha.train.loop as loop
import sd_loha.train.sampling as sampling
from sd_loha import cli
from sd_loha.layers import LoHALayer
from sd_loha.sd3_network import FusedLoHA
from sd_loha.train import lowmem
from sd_loha.train.config import ConfigError, load, load_config
from sd_loha.train.loop import Trainer

from .helpers import DEMO_IMAGES, REPO, assert_file_loads_everywhere, read_file

CONFIGS = REPO / "train_configs"


def _cli_run(config: str, model: str, out, extra: list[str], steps: int = 4) -> None:
    args = ["train", "--config", str(CONFIGS / config)]
    for o in [f"pretrained_model={model}", f"train_data_dir={DEMO_IMAGES}", "resolution=64", "min_bucket_reso=64",
              "max_bucket_reso=128", "bucket_reso_steps=64", f"max_train_steps={steps}", "sample_steps=2",
              "sample_width=64", "sample_height=64", "mixed_precision=bf16", f"output_dir={out}", *extra]:
        args += ["--set", o]
    assert cli.main(args) == 0


class _Watch:
    """Captures the CLI's Trainer and, when its run ends, what the test inspects."""

    def __init__(self, monkeypatch, measure: bool = False) -> None:
        self.trainer: Trainer | None = None
        self.losses: dict[float, float] = {}
        self.stored: dict[str, tuple[str, int]] = {}
        watch = self
        setup, finish = Trainer.setup, Trainer._finish

        def capture(trainer, *a, **kw):
            watch.trainer = trainer
            return setup(trainer, *a, **kw)

        def at_end(trainer, *a, **kw):
            watch.stored = _storage(trainer)
            if measure:
                watch.losses = {m: _fixed_loss(trainer, m) for m in (0.0, 1.0)}
            return finish(trainer, *a, **kw)

        monkeypatch.setattr(Trainer, "setup", capture)
        monkeypatch.setattr(Trainer, "_finish", at_end)


def _storage(trainer: Trainer) -> dict[str, tuple[str, int]]:
    """component/module name -> (how the frozen layer under each LoHA layer, or each plain layer of a text
    encoder, stores its weight; its input width, 0 for a conv)."""
    out = {}
    parts = {"unet": trainer.unet, "text_encoder": trainer.pipe.text_encoder,
             "text_encoder_2": getattr(trainer.pipe, "text_encoder_2", None),
             "text_encoder_3": getattr(trainer.pipe, "text_encoder_3", None)}
    for part, model in parts.items():
        if model is None:
            continue
        for name, m in model.named_modules():
            if isinstance(m, FusedLoHA):
                continue  # the factors of a fused SD 3.x layer: its RowSlices hold the bases
            base = m.base if isinstance(m, LoHALayer) else m
            if isinstance(m, LoHALayer) or (part != "unet" and isinstance(m, torch.nn.Linear)
                                            and not name.endswith(".base")):
                out[f"{part}/{name}"] = (lowmem.stored_as(base), getattr(base, "in_features", 0))
    return out


@torch.no_grad()
def _fixed_loss(trainer: Trainer, multiplier: float, batches: int = 4) -> float:
    """The mean training loss of the first batches of the loader, the same noise and timesteps every call."""
    trainer._set_train_mode(False)
    trainer.network.set_multiplier(multiplier)
    try:
        total, gen = 0.0, torch.Generator().manual_seed(123)
        for i, batch in enumerate(trainer.loader):
            if i == batches:
                break
            total += float(trainer.loss_step(batch, gen))
        return total / batches
    finally:
        trainer.network.set_multiplier(1.0)
        trainer._set_train_mode(True)


# ---- placement -------------------------------------------------------------------------------------------
def test_idle_components_and_their_placement_for_a_gpu():
    idle = lowmem.idle_components(latents_cached=True, text_cached=True, text_encoders=("text_encoder", "text_encoder_2"))
    assert idle == ("vae", "text_encoder", "text_encoder_2")
    assert lowmem.idle_components(latents_cached=False, text_cached=False, text_encoders=("text_encoder",)) == ()
    assert lowmem.idle_components(latents_cached=True, text_cached=False, text_encoders=("text_encoder",)) == ("vae",)


class _Component:
    """A pipeline component that records where it is sent (a CUDA device works without one)."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def to(self, device):
        self.log.append((self.name, str(torch.device(device))))
        return self


def test_offloader_moves_idle_components_between_the_gpu_and_the_cpu():
    log: list = []
    pipe = types.SimpleNamespace(**{n: _Component(log, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")})
    off = lowmem.Offloader(pipe, ("vae", "text_encoder", "text_encoder_2"), "cuda")
    assert off.parked == ()
    off.park()
    assert off.parked == ("vae", "text_encoder", "text_encoder_2")
    assert log == [("vae", "cpu"), ("text_encoder", "cpu"), ("text_encoder_2", "cpu")]
    log.clear()
    with off.using(("vae",)):  # validation
        assert off.parked == ("text_encoder", "text_encoder_2") and log == [("vae", "cuda")]
    assert log == [("vae", "cuda"), ("vae", "cpu")]
    log.clear()
    with off.using():  # a sample grid; a nested use of what is already back moves nothing
        with off.using(lowmem.TEXT_ENCODERS):
            pass
        assert off.parked == ()
    assert log == [("vae", "cuda"), ("text_encoder", "cuda"), ("text_encoder_2", "cuda"),
                   ("vae", "cpu"), ("text_encoder", "cpu"), ("text_encoder_2", "cpu")]
    assert not any(name == "unet" for name, _ in log)


def test_sdxl_run_parks_vae_and_text_encoders_and_samples_bring_them_back(tmp_path, monkeypatch):
    """sdxl_style caches latents and text-encoder outputs: the VAE and both encoders leave the device after the
    caches are built; each sample grid and each validation brings back what it runs and parks it again; the
    file is the one a run without offloading writes."""
    moves: list[tuple[str, str]] = []
    states: list[tuple[str, tuple[str, ...]]] = []
    move = lowmem.Offloader._move

    def record(self, name, device):  # on the CPU both ends are "cpu": tell them apart by the Offloader's state
        moves.append(("bring" if name in self._away else "park", name))
        return move(self, name, device)

    monkeypatch.setattr(lowmem.Offloader, "_move", record)
    from diffusers import UNet2DConditionModel
    unet_to = UNet2DConditionModel.to

    def unet_moved(self, *a, **kw):
        if hasattr(watch.trainer, "offload"):  # set up after the pipeline is loaded (on the CPU)
            moves.append(("move", "unet"))
        return unet_to(self, *a, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "to", unet_moved)
    watch = _Watch(monkeypatch)
    sample_images = sampling.sample_images

    def sampled(pipe, cfg, prompts=None):
        states.append(("sample", watch.trainer.offload.parked))
        return sample_images(pipe, cfg, prompts)

    monkeypatch.setattr(sampling, "sample_images", sampled)
    extra = ["sample_every_n_steps=2", "save_every_n_steps=100", "validation_split=0.2", "validation_every_n_steps=2"]
    _cli_run("sdxl_style.toml", "tiny-sdxl", tmp_path / "a", extra)
    trainer = watch.trainer
    assert trainer.offload.idle == ("vae", "text_encoder", "text_encoder_2")
    assert trainer.offload.parked == ("vae", "text_encoder", "text_encoder_2")  # parked again after the last use
    # the UNet goes to the device only after the caching encoders left it
    assert moves[:4] == [("park", "vae"), ("park", "text_encoder"), ("park", "text_encoder_2"), ("move", "unet")]
    moves.remove(("move", "unet"))
    # samples ran with nothing parked, and each component alternates: brought back, parked again
    assert states and all(parked == () for _, parked in states)
    for name in trainer.offload.idle:
        seen = [what for what, n in moves if n == name]
        assert seen[0] == "park" and seen[-1] == "park" and len(seen) % 2 == 1
        assert all(a != b for a, b in zip(seen, seen[1:])), (name, seen)
    brought = [n for what, n in moves if what == "bring"]
    # validation at steps 2 and 4 brings back the VAE only; the sample grids (step 2, final) bring back all three
    assert len(trainer.val_losses) == 2 and len(states) >= 2
    assert brought.count("text_encoder") == brought.count("text_encoder_2") >= 2
    assert brought.count("vae") == brought.count("text_encoder") + 2

    # the same run without offloading writes the same file
    monkeypatch.setattr(loop, "idle_components", lambda **kw: ())
    _cli_run("sdxl_style.toml", "tiny-sdxl", tmp_path / "b", extra)
    assert watch.trainer.offload.parked == ()
    a, _ = read_file(tmp_path / "a" / "sdxl_style.safetensors")
    b, _ = read_file(tmp_path / "b" / "sdxl_style.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the frozen base's storage ---------------------------------------------------------------------------------
# (option, shipped config, tiny model, the file's text-encoder parts, whether the text encoders are frozen)
STORAGE_RUNS = {
    "fp8_base": ("fp8_base=true", "sdxl_style.toml", "tiny-sdxl", (), True),
    "fp8": ("base_weight_dtype=fp8", "sd15_style.toml", "tiny-sd1", (), True),
    "nf4": ("base_weight_dtype=nf4", "sdxl_style.toml", "tiny-sdxl", (), True),
    "int8": ("base_weight_dtype=int8 train_text_encoder=true", "demo.toml", "toy-sd1", ("te",), False),
    # SD 3.x: the MMDiT (fused qkv trained through RowSlices over the quantized q, k, v) and frozen CLIPs and T5
    "fp8_sd3": ("base_weight_dtype=fp8", "sd35_style.toml", "tiny-sd3", (), True),
    "nf4_sd3": ("base_weight_dtype=nf4", "sd35_style.toml", "tiny-sd3", (), True),
}


@pytest.mark.parametrize("case", sorted(STORAGE_RUNS))
def test_low_precision_base_learns_and_writes_a_normal_file(tmp_path, monkeypatch, case):
    option, config, model, te_parts, frozen_te = STORAGE_RUNS[case]
    if case in ("nf4", "int8", "nf4_sd3"):
        pytest.importorskip("bitsandbytes", reason="nf4 / int8 bases need bitsandbytes")
    watch = _Watch(monkeypatch, measure=True)
    out = tmp_path / "out"
    _cli_run(config, model, out, [*option.split(), "sample_every_n_steps=100", "save_every_n_steps=100"], steps=6)

    storage = "fp8" if case.startswith("fp8") else case.removesuffix("_sd3")
    def expected(width: int, frozen: bool = True) -> str:
        """fp8: Linear and Conv alike; nf4 / int8: Linear layers (nf4: whole 64-wide blocks), convs bf16."""
        if not frozen or (storage != "fp8" and (width == 0 or (storage == "nf4" and width % lowmem.NF4_BLOCK))):
            return "bfloat16"
        return storage

    unet = {k: v for k, v in watch.stored.items() if k.startswith("unet/")}
    te = {k: v for k, v in watch.stored.items() if not k.startswith("unet/")}
    assert len(unet) > 10 and te
    # T5 keeps its `wo` layers (transformers' _keep_in_fp32_modules) in the compute dtype: T5 casts their input to
    # their weight's dtype, which an fp8 / 4-bit weight breaks
    t5 = getattr(watch.trainer.pipe, "text_encoder_3", None)
    kept = tuple(f".{n}" for n in (getattr(t5, "_keep_in_fp32_modules", None) or ()))
    for layers, frozen in ((unet, True), (te, frozen_te)):
        wrong = {k: v for k, (v, width) in layers.items()
                 if v != ("bfloat16" if k.startswith("text_encoder_3/") and k.endswith(kept) else expected(width, frozen))}
        assert not wrong, list(wrong.items())[:5]
    assert sum(v == storage for v, _ in unet.values()) > 10

    # the text encoders wait on the CPU when frozen and their outputs cached: sdxl_style and sd35_style cache them;
    # sd15_style shuffles its captions (nothing to cache) and the int8 run trains its text encoder: only the VAE
    encoders = tuple(n for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                     if getattr(watch.trainer.pipe, n, None) is not None)
    cached = frozen_te and not load_config(CONFIGS / config).shuffle_caption
    assert watch.trainer.offload.parked == (("vae", *encoders) if cached else ("vae",))
    # the run learned: its adapter lowers the loss of the same batches, noise and timesteps
    assert watch.losses[1.0] < watch.losses[0.0], watch.losses
    path = out / f"{load_config(CONFIGS / config).output_name}.safetensors"
    meta = read_file(path)[1]
    assert meta["ss_fp8_base"] == str(storage == "fp8") and meta["ss_base_weight_dtype"] == storage
    assert_file_loads_everywhere(path, model, monkeypatch, te_parts)


def test_fp8_checkpointed_gradients_match_uncheckpointed():
    """The determinism check is off for fp8 + gradient checkpointing: the gradients it lets through are the
    ones of the same step without checkpointing."""
    from sd_loha.models import build_tiny_pipeline
    from sd_loha.network import add_loha

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        pipe = build_tiny_pipeline("tiny-sd1")
        unet = pipe.unet.to(torch.bfloat16)
        lowmem.store_frozen_base(unet, "fp8", torch.bfloat16)
        net = add_loha(pipe, preset="full", rank=2, text_encoder=False)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.1)
        if checkpointing:
            unet.enable_gradient_checkpointing(lowmem.checkpointing_func("fp8"))
        unet.train()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen).to(torch.bfloat16)
        cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen).to(torch.bfloat16)
        unet(x, torch.tensor([10]), cond).sample.float().square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_fp8_base_and_another_base_dtype_are_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="fp8_base"):
        load({"pretrained_model": "tiny-sd1", "train_data_dir": str(DEMO_IMAGES), "output_dir": str(tmp_path),
                     "fp8_base": True, "base_weight_dtype": "nf4"})


def test_quantized_base_without_bitsandbytes_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lowmem, "bitsandbytes_installed", lambda: False)
    loaded = []
    monkeypatch.setattr(loop, "load_pipeline", lambda *a, **kw: loaded.append(a))
    args = ["train", "--config", str(CONFIGS / "sdxl_style.toml"), "--set", "pretrained_model=tiny-sdxl",
            "--set", f"train_data_dir={DEMO_IMAGES}", "--set", f"output_dir={tmp_path}", "--set",
            "base_weight_dtype=int8"]
    assert cli.main(args) != 0
    err = capsys.readouterr().err
    assert "bitsandbytes" in err and "pip install" in err and "base_weight_dtype" in err
    assert loaded == []


# ---- LoHA layers on a low-precision base ---------------------------------------------------------------------
def _frozen_layer(storage: str, conv: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """A frozen 64-wide layer stored as ``storage`` (computing in fp32) and the weight it computes with."""
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(64, 32, 3, padding=1) if conv else torch.nn.Linear(64, 32)
    holder = torch.nn.Sequential(layer)
    lowmem.store_frozen_base(holder, storage, torch.float32)
    holder.to("cpu")  # bitsandbytes quantizes as the layer moves
    from sd_loha.forward import base_weight
    return holder[0], base_weight(holder[0])


@pytest.mark.parametrize("storage,conv", [("fp8", False), ("fp8", True), ("nf4", False), ("int8", False)])
def test_loha_layer_adds_its_delta_to_a_low_precision_base(storage, conv):
    """The delta and Khatri-Rao paths give base(x) + ΔW·x on top of the stored layer; merging into it is never
    chosen and refused when asked for; DoRA's magnitude starts at the norm of the weight the layer computes with."""
    import torch.nn.functional as F

    if storage in ("nf4", "int8"):
        pytest.importorskip("bitsandbytes")
    base, w = _frozen_layer(storage, conv)
    assert lowmem.stored_as(base) == storage
    assert w.dtype == torch.float32 and w.shape[:2] == (32, 64)
    layer = LoHALayer(base, rank=4, alpha=2.0)
    torch.nn.init.normal_(layer.hada_w2_a, std=0.1)
    x = torch.randn(2, 64, 5, 5) if conv else torch.randn(3, 64)
    with torch.no_grad():
        y0 = base(x)
        dw = layer.delta_weight()
        expected = y0 + (F.conv2d(x, dw, None, 1, 1) if conv else F.linear(x, dw))
        for path in ("delta", "kr"):
            layer.path = path
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
        layer.path = "auto"
        layer(x)
        assert layer.last_path in ("delta", "kr")
        layer.path = "merge"
        with pytest.raises(ValueError, match="merge"):
            layer(x)
    dora = LoHALayer(base, rank=4, dora_wd=True)
    from sd_loha import ops
    torch.testing.assert_close(dora.dora_scale.detach(), ops.dora_magnitude(w, False))
    torch.nn.init.normal_(dora.hada_w2_a, std=0.1)
    with torch.no_grad():
        d = dora.dora_delta()
        torch.testing.assert_close(dora(x), y0 + (F.conv2d(x, d, None, 1, 1) if conv else F.linear(x, d)),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width", [64, 48])
def test_nf4_base_trains_after_an_eval_forward(width):
    """Sampling / validation run the frozen nf4 layers in eval mode without gradients; training goes on after.
    On CPUs with AVX512-BF16 bitsandbytes would repack the weight for its inference kernel at that first eval
    forward: the next training forward then failed, and a width not a multiple of 32 (toy-sd1 has 48) failed at
    once. Every forward gives the same output, eval or training."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Linear(64, width))
    lowmem.store_frozen_base(holder, "nf4", torch.bfloat16)
    holder.to("cpu")
    assert lowmem.stored_as(holder[0]) == "nf4"
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    holder.eval()
    with torch.no_grad():
        y_eval = holder(x)
    holder.train()
    xg = x.clone().requires_grad_(True)
    y_train = holder(xg)
    y_train.float().sum().backward()
    assert xg.grad is not None and bool(xg.grad.abs().sum() > 0)
    torch.testing.assert_close(y_train.detach(), y_eval)


def test_out_of_memory_advice_names_the_low_memory_options():
    from sd_loha.train.runtime import oom_advice

    def advice(**kw) -> str:
        cfg = load({"pretrained_model": "tiny-sd1", "train_data_dir": str(DEMO_IMAGES), "output_dir": "out",
                    **kw}).config
        return oom_advice(cfg, MemoryError("out of memory"))

    assert "fp8_base = true" in advice() and "nf4" in advice()
    assert "fp8_base = true" not in advice(fp8_base=True) and '"nf4"' in advice(fp8_base=True)
    assert "fp8_base" not in advice(base_weight_dtype="nf4") and '"nf4"' not in advice(base_weight_dtype="nf4")
    assert "cache_text_encoder_outputs = true" in advice(train_text_encoder=False)


def test_fp8_base_with_a_diffusers_without_layerwise_casting_is_refused(tmp_path, monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.32.2" if name == "diffusers" else "1.0")
    with pytest.raises(ConfigError, match=r"diffusers>=0\.33"):
        load({"pretrained_model": "tiny-sd1", "train_data_dir": str(DEMO_IMAGES), "output_dir": str(tmp_path),
              "fp8_base": True})
    load({"pretrained_model": "tiny-sd1", "train_data_dir": str(DEMO_IMAGES), "output_dir": str(tmp_path)})
