"""The device-memory estimate: each of its parts against the real thing it predicts.

- weights: the bytes a bitsandbytes layer will have once quantized, predicted before it is, against the bytes after
  it is; the fp8 / nf4 / int8 projections the suggestions use against the real storage of lowmem;
- optimizer state: the per-shape probe against the states the real optimizer holds after a real step on the whole
  network (AdamW, AdamW8bit, Prodigy, SGD with momentum, Adafactor);
- activations: the table's rows, what it interpolates between them, and that batch scales as measured;
- the run: through the CLI with shipped configs, the estimate printed before training equals what the UNet really
  holds once on the device; on CUDA (the free memory stood in for) it says whether the run fits and which options
  bring it down.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from sd_loha import add_loha
from sd_loha.architectures import UNETS
from sd_loha.models import build_tiny_pipeline
from sd_loha.train import lowmem, memory
from sd_loha.train.config import load
from sd_loha.train.loop import Trainer
from sd_loha.train.optim import make_optimizer

from .helpers import DEMO_IMAGES
from .test_lowmem import _cli_run


def _tiny_unet(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    return build_tiny_pipeline("tiny-sdxl").unet.to(dtype).requires_grad_(False)


def _total(by_storage: dict[str, int]) -> int:
    return sum(by_storage.values())


# ---- weights ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_quantized_bytes_predicted_before_quantizing_equal_the_bytes_after(storage):
    pytest.importorskip("bitsandbytes", reason="nf4 / int8 need bitsandbytes")
    unet = _tiny_unet()
    before = memory.projected_bytes(unet, storage, torch.bfloat16)
    assert lowmem.store_frozen_base(unet, storage, torch.bfloat16) > 10
    pending = memory.stored_bytes(unet)  # layers replaced, not yet quantized
    unet.to("cpu")  # bitsandbytes quantizes as the layers move
    after = memory.stored_bytes(unet)
    assert pending == after, (pending, after)
    assert after[storage] > 0 and before == after, (before, after)
    assert _total(after) < _total(memory.stored_bytes(_tiny_unet())) * (0.7 if storage == "nf4" else 0.8)


def test_fp8_projection_equals_the_layerwise_cast_storage():
    unet = _tiny_unet()
    projected = memory.projected_bytes(unet, "fp8", torch.bfloat16)
    lowmem.store_frozen_base(unet, "fp8", torch.bfloat16)
    stored = memory.stored_bytes(unet)
    assert stored["fp8"] > 0 and stored == projected, (stored, projected)


def test_adapter_tensors_are_counted_apart_from_the_weights():
    unet = _tiny_unet()
    plain = memory.stored_bytes(unet)
    net = add_loha(unet, rank=4)
    adapter = [t for m in net.modules for t in [*m.layer.parameters(recurse=False), *m.layer.buffers(recurse=False)]]
    assert memory.stored_bytes(unet, adapter) == plain
    assert _total(memory.stored_bytes(unet)) == _total(plain) + sum(t.numel() * t.element_size() for t in adapter)


# ---- optimizer state -----------------------------------------------------------------------------------------------
OPTIMIZERS = {"AdamW": {}, "AdamW8bit": {}, "Prodigy": {}, "SGD": {"momentum": 0.9}, "Adafactor": {}}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_probe_equals_the_real_optimizer_state(name):
    if name == "AdamW8bit":
        pytest.importorskip("bitsandbytes")
    if name == "Prodigy":
        pytest.importorskip("prodigyopt")
    args = OPTIMIZERS[name]
    net = add_loha(_tiny_unet(torch.float32), rank=8, conv_rank=4, preset="full")
    params = net.parameters()
    assert len({tuple(p.shape) for p in params}) > 5 and any(p.numel() >= 4096 for p in params)
    probed = memory.optimizer_state_bytes(params, lambda ps: make_optimizer(name, [{"params": ps}], 1e-3, dict(args)))

    opt = make_optimizer(name, [{"params": params}], 1e-3, dict(args))
    for p in params:
        p.data.normal_(std=1e-2)  # no factor all zero: Prodigy keeps a scalar copy of those (the probe a full one)
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    real = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
            for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    assert probed == sum(real.values()) > 0
    n = sum(p.numel() for p in params)
    if name == "AdamW":
        assert probed == 8 * n + 4 * len(params)  # two fp32 moments per weight, a step counter per tensor


# ---- activations -----------------------------------------------------------------------------------------------------
def _rows() -> list[dict]:
    return json.loads(memory.ACTIVATION_TABLE.read_text())["rows"]


def test_activation_table_rows_are_read_back_and_interpolated_on_a_power_law():
    rows = [r for r in _rows() if r["family"] == "sdxl" and r["preset"] == "attn-mlp" and r["batch"] == 1
            and r["checkpointing"] and r["element_bytes"] == 2]
    sizes = sorted(r["width"] for r in rows)
    assert len(sizes) >= 3
    for r in rows:  # measured sizes come back as measured
        assert memory.activation_bytes("sdxl", "attn-mlp", r["width"] * r["height"], 1, True, 2) == r["saved_bytes"]
    lo, hi = (next(r["saved_bytes"] for r in rows if r["width"] == s) for s in sizes[:2])
    mid = int(math.sqrt(sizes[0] * sizes[1])) ** 2  # the geometric middle of the pixel counts
    between = memory.activation_bytes("sdxl", "attn-mlp", mid, 1, True, 2)
    assert lo < between < hi and between == pytest.approx(math.sqrt(lo * hi), rel=0.01)
    # the checkpointed step keeps less; fp32 keeps about twice bf16; nothing for a family that was not measured
    assert memory.activation_bytes("sdxl", "attn-mlp", 1024 ** 2, 1, False, 2) > 3 * memory.activation_bytes(
        "sdxl", "attn-mlp", 1024 ** 2, 1, True, 2)
    assert memory.activation_bytes("sdxl", "attn-mlp", 1024 ** 2, 1, True, 4) == pytest.approx(
        2 * memory.activation_bytes("sdxl", "attn-mlp", 1024 ** 2, 1, True, 2), rel=0.15)
    assert memory.activation_bytes("sd3", "attn-mlp", 1024 ** 2, 1, True, 2) is None


def test_batch_scales_the_activations_as_the_table_measured_it():
    for r in (r for r in _rows() if r["batch"] == 2):
        estimated = memory.activation_bytes(r["family"], r["preset"], r["width"] * r["height"], 2, r["checkpointing"],
                                            r["element_bytes"])
        assert estimated == pytest.approx(r["saved_bytes"], rel=0.05), r


def test_architecture_of_knows_the_real_unets_and_no_other():
    assert {memory.architecture_of(cfg) for cfg in UNETS.values()} == {"sd1", "sd2", "sdxl"}
    assert memory.architecture_of(build_tiny_pipeline("tiny-sdxl").unet.config) is None
    with torch.device("meta"):
        real = UNet2DConditionModel(**UNETS["sdxl"])
    assert memory.architecture_of(real.config) == "sdxl"  # diffusers' own config, lists and all


# ---- the run ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,config,model", [
    ("base_weight_dtype=nf4", "sdxl_style.toml", "tiny-sdxl"),
    ("fp8_base=true", "sd15_style.toml", "tiny-sd1"),
])
def test_the_run_prints_an_estimate_that_equals_what_the_unet_holds_on_the_device(tmp_path, monkeypatch, capsys,
                                                                                   option, config, model):
    if "nf4" in option:
        pytest.importorskip("bitsandbytes")
    seen: dict[str, object] = {}
    finish = Trainer._finish

    def at_end(trainer, *a, **kw):  # the network is still in place, the UNet on the device, quantized
        adapter = [t for m in trainer.network.modules
                   for t in [*m.layer.parameters(recurse=False), *m.layer.buffers(recurse=False)]]
        seen.update(est=trainer.memory, held=memory.stored_bytes(trainer.unet, adapter), parked=trainer.offload.parked,
                    adapter=sum(t.numel() * t.element_size() for t in adapter))
        return finish(trainer, *a, **kw)

    monkeypatch.setattr(Trainer, "_finish", at_end)
    _cli_run(config, model, tmp_path / "out", [option, "sample_every_n_steps=100", "save_every_n_steps=100"], steps=2)
    est, held = seen["est"], seen["held"]
    printed = capsys.readouterr().out
    assert "device memory for training (estimate, cpu)" in printed and "optimizer state" in printed
    storage = "nf4" if "nf4" in option else "fp8"
    assert est.inputs.weights["unet"] == held and held[storage] > 0
    assert est.inputs.adapter == seen["adapter"] > 0
    # what the estimate (made before caching) left out is what the run parked; sd15_style shuffles its captions, so
    # the text encoder's outputs cannot be cached and it stays on the device
    assert set(est.inputs.weights) == ({"unet"} if "sdxl" in config else {"unet", "text_encoder"})
    assert set(est.inputs.weights) | set(seen["parked"]) == {"unet", "vae", *lowmem.TEXT_ENCODERS[:2 if "sdxl" in config else 1]}
    assert est.fits is None  # the CPU: nothing to compare with


def _cuda_says(monkeypatch, free: int) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 400 * 2 ** 30))


def test_on_cuda_a_run_that_does_not_fit_gets_the_options_that_bring_it_down(monkeypatch):
    pytest.importorskip("bitsandbytes")
    cfg = load({"pretrained_model": "tiny-sdxl", "train_data_dir": str(DEMO_IMAGES), "output_dir": "out",
                "train_batch_size": 4, "mixed_precision": "bf16", "train_text_encoder": False}).config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNETS["sdxl"]).to(torch.bfloat16).requires_grad_(False)
    net = add_loha(unet, preset=cfg.preset, rank=cfg.network_dim)

    def estimate(free: int):
        _cuda_says(monkeypatch, free)
        return memory.run_estimate(cfg, components={"unet": unet}, parked=(), frozen=("unet",), network=net,
                                   unet_config=unet.config,
                                   compute_dtype=torch.bfloat16, pixels=1024 * 1024, device=torch.device("cuda"))

    roomy = estimate(400 * 2 ** 30)
    assert roomy.fits is True and roomy.suggestions == ()
    weights = _total(roomy.inputs.weights["unet"])
    assert 4.5 * 2 ** 30 < weights < 5.5 * 2 ** 30  # SDXL's UNet in bf16: 2.57 G parameters
    assert roomy.inputs.architecture == "sdxl" and roomy.inputs.activations > 0

    tight = estimate(int(roomy.total * 0.9))
    assert tight.fits is False
    changes = dict(tight.suggestions)
    assert all(total < tight.total for total in changes.values())
    together = changes.pop("all of these together (one base_weight_dtype)")
    assert together < min(changes.values()) and list(changes.values()) == sorted(changes.values())
    assert {"gradient_checkpointing = true", 'base_weight_dtype = "fp8"', 'base_weight_dtype = "nf4"'} <= set(changes)
    assert any(c.startswith("train_batch_size = 1") for c in changes)
    # nf4 saves more than fp8, which halves the bf16 weights
    fp8, nf4 = changes['base_weight_dtype = "fp8"'], changes['base_weight_dtype = "nf4"']
    assert nf4 < fp8 and tight.total - fp8 == pytest.approx(weights / 2, rel=0.1)
    text = tight.format()
    assert "does NOT fit" in text and "gradient_checkpointing = true: about" in text


def test_out_of_memory_advice_leads_with_the_estimates_options(monkeypatch):
    from sd_loha.train.runtime import oom_advice

    cfg = load({"pretrained_model": "tiny-sdxl", "train_data_dir": str(DEMO_IMAGES), "output_dir": "out",
                "mixed_precision": "bf16"}).config
    inputs = memory.MemoryInputs(weights={"unet": {"bf16": 5 * 2 ** 30}}, adapter=0, gradients=0, optimizer=0,
                                 optimizer_name="AdamW", architecture="sdxl", preset="attn-mlp", pixels=1024 ** 2,
                                 batch=1, checkpointing=False, element_bytes=2)
    _cuda_says(monkeypatch, 4 * 2 ** 30)
    est = memory.estimate_memory(inputs, device=torch.device("cuda"),
                                 alternatives=[("gradient_checkpointing = true", memory.replace(inputs, checkpointing=True))])
    assert est.fits is False
    text = oom_advice(cfg, RuntimeError("CUDA out of memory"), est)
    assert f"The estimate before the first step was {est.total / 2 ** 30:.1f} GiB" in text
    assert text.index("gradient_checkpointing = true (estimated") < text.index("fp8_base")
    assert text.count("gradient_checkpointing") == 1  # the measured tip replaces the plain one
