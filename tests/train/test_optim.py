"""Optimizers by name, through the trainer: every optimizer the docs name trains, a bad one is refused before any
model loads; the LR schedules' options."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import sd_loha.models
from sd_loha.train import loop as train_loop
from sd_loha.train import train
from sd_loha.train.config import ConfigError
from sd_loha.train.optim import (
    KNOWN_OPTIMIZERS,
    OptimizerError,
    check_optimizer_args,
    make_optimizer,
    make_scheduler,
    resolve_optimizer,
)

from .helpers import base_config, read_file


def _lrs(name: str, steps: int = 10, **kw) -> list[float]:
    opt = make_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    sched = make_scheduler(name, opt, warmup_steps=0, total_steps=steps, **kw)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_scheduler_cycles_and_power_reach_the_schedule():
    # cosine_with_restarts, 2 cycles over 10 steps: back at the full rate at step 5
    lrs = _lrs("cosine_with_restarts", num_cycles=2)
    assert lrs[0] == pytest.approx(1.0) and lrs[5] == pytest.approx(1.0) and lrs[4] < 0.2
    assert _lrs("cosine_with_restarts", num_cycles=1)[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    # polynomial decay to 1e-7 with power 2: (1 - t/T)^2 at t = 5
    assert _lrs("polynomial", power=2.0)[5] == pytest.approx((1 - 1e-7) * 0.25 + 1e-7, rel=1e-6)
    assert _lrs("polynomial", power=1.0)[5] == pytest.approx((1 - 1e-7) * 0.5 + 1e-7, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# names -> classes
# ---------------------------------------------------------------------------------------------


def test_names_resolve_to_their_classes():
    import bitsandbytes as bnb
    import prodigyopt

    assert resolve_optimizer("adamw").cls is torch.optim.AdamW
    assert resolve_optimizer("sgd").name == "SGD"
    assert resolve_optimizer("adamw8bit").cls is bnb.optim.AdamW8bit
    assert resolve_optimizer("PAGEDADAMW8BIT").cls is bnb.optim.PagedAdamW8bit
    assert resolve_optimizer("lion8bit").cls is bnb.optim.Lion8bit
    assert resolve_optimizer("prodigy").cls is prodigyopt.Prodigy
    assert resolve_optimizer("torch.optim.RAdam").cls is torch.optim.RAdam
    assert resolve_optimizer("bitsandbytes.optim.PagedAdamW8bit").cls is bnb.optim.PagedAdamW8bit
    assert resolve_optimizer(" prodigyopt.Prodigy ").name == "prodigyopt.Prodigy"
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
    assert type(make_optimizer("SGD", params, 1e-3, {"momentum": 0.9})) is torch.optim.SGD


def test_fused_only_for_torch_adam():
    params = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))]}]
    assert make_optimizer("AdamW", params, 1e-3, fused_ok=True).defaults["fused"] is True
    assert make_optimizer("AdamW", params, 1e-3, {"fused": False}, fused_ok=True).defaults["fused"] is False
    assert "fused" not in make_optimizer("Prodigy", params, 1.0, fused_ok=True).defaults


@pytest.mark.parametrize("name", list(KNOWN_OPTIMIZERS))
def test_every_known_name_steps(name):
    import importlib.util

    if importlib.util.find_spec(KNOWN_OPTIMIZERS[name].module.split(".")[0]) is None:
        pytest.skip(f"{KNOWN_OPTIMIZERS[name].pip} is not installed")
    gen = torch.Generator().manual_seed(0)
    # a LoHA-like product; 64 x 64 factors are 4096 elements, so bitsandbytes' 8-bit optimizers keep 8-bit state
    a, b = (torch.nn.Parameter(torch.randn(64, 64, generator=gen) * 0.1) for _ in range(2))
    target = torch.randn(64, 64, generator=gen)
    opt = make_optimizer(name, [{"params": [a, b]}], lr=1.0 if name == "Prodigy" else 1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ((a @ b - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    with torch.no_grad():
        losses.append(float(((a @ b - target) ** 2).mean()))
    assert losses[-1] < losses[0], losses  # it stepped downhill, not merely somewhere


@pytest.mark.parametrize("name, expected", [
    ("AdamWW", "did you mean 'AdamW'?"),
    ("adamw8bitt", "did you mean 'AdamW8bit'?"),
    ("LBFGS", "'LBFGS' cannot be used: it needs a closure"),
    ("torch.optim.Adamw", "torch.optim has no 'Adamw' (did you mean 'torch.optim.AdamW'?)"),
    ("torch.optim.lr_scheduler.LambdaLR", "is not an optimizer class"),
    ("nosuchpackage.Opt", "there is no module 'nosuchpackage'; install the package that provides it"),
])
def test_bad_names(name, expected):
    with pytest.raises(OptimizerError, match="optimizer_type") as ei:
        resolve_optimizer(name)
    assert expected in str(ei.value)


@pytest.mark.parametrize("name", ["Prodigy", "AdamW8bit", "Lion"])
def test_missing_package_says_what_to_install(name, monkeypatch):
    src = KNOWN_OPTIMIZERS[name]
    monkeypatch.setitem(sys.modules, src.module.split(".")[0], None)  # importing it fails as if not installed
    with pytest.raises(OptimizerError) as ei:
        resolve_optimizer(name)
    assert f"optimizer_type '{name}' needs the package '{src.pip}'" in str(ei.value)
    assert f"pip install {src.pip}" in str(ei.value)


@pytest.mark.parametrize("name, args, expected", [
    ("AdamW", {"betass": [0.9, 0.99]}, "'betass' is not an argument of optimizer_type 'AdamW' (did you mean 'betas'?)"),
    ("AdamW", {"decouple": True}, "its arguments: betas, eps, weight_decay"),
    ("Prodigy", {"d_coeff": 2.0}, "did you mean 'd_coef'?"),
    ("AdamW", {"betas": [1.5, 0.99]}, "Invalid beta parameter at index 0: 1.5"),
    ("AdamW", {"lr": 1e-3}, "'lr' cannot be given; set learning_rate"),
])
def test_bad_optimizer_args(name, args, expected):
    with pytest.raises(OptimizerError) as ei:
        check_optimizer_args(resolve_optimizer(name), args, 1e-4)
    assert expected in str(ei.value)
    check_optimizer_args(resolve_optimizer("Prodigy"), {"decouple": True, "d_coef": 2, "betas": [0.9, 0.99]}, 1.0)


# ---------------------------------------------------------------------------------------------
# through the trainer
# ---------------------------------------------------------------------------------------------


def _train(tmp_path: Path, steps: int = 2, **overrides):
    """A few steps on tiny-sd1 (UNet only) with a resumable state; returns the result and the saved optimizer state."""
    cfg = base_config(tmp_path / "out", max_train_steps=steps, save_state=True, train_text_encoder=False, **overrides)
    result = train(cfg, progress=False)
    assert result.steps == steps
    state = torch.load(max((tmp_path / "out").glob("state-*")) / "optimizer.pt", weights_only=True)["optimizer"]
    return result, state


def _assert_weights_moved(result) -> None:
    # LoHA starts with w2_a = 0 (ΔW = 0); only optimizer steps make it nonzero
    tensors, _ = read_file(result.output)
    w2a = {k: t for k, t in tensors.items() if k.endswith("hada_w2_a")}
    assert w2a and all(float(t.abs().max()) > 0 for t in w2a.values())


def test_adamw_trains(tmp_path):
    result, state = _train(tmp_path, optimizer_type="adamw", optimizer_args={"weight_decay": 0.01})
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(state["state"].values())))
    assert state["param_groups"][0]["weight_decay"] == 0.01  # optimizer_args reached the optimizer
    _assert_weights_moved(result)


def test_adamw8bit_keeps_8bit_state(tmp_path):
    # bitsandbytes keeps tensors under min_8bit_size (4096 elements) in 32 bits; rank 16 makes the largest tiny-sd1
    # factors (512 x 16, 256 x 16, 16 x 256: the feed-forward layers) big enough for 8-bit state, as the larger
    # factors of a real SD model are
    result, state = _train(tmp_path, optimizer_type="AdamW8bit", network_dim=16, network_alpha=8.0)
    quant = [s["__bnb_optimizer_quant_state__"] for s in state["state"].values()]
    big = [q for q in quant if q["state1"].numel() >= 4096]
    assert big and all(q["state1"].dtype == torch.uint8 and q["state2"].dtype == torch.uint8 for q in big)
    assert all(q["state1"].dtype == torch.float32 for q in quant if q["state1"].numel() < 4096)
    _assert_weights_moved(result)


def test_prodigy_estimates_d(tmp_path):
    # Prodigy's d (its step-size estimate) starts at d0; its numerator needs the distance the weights moved, so it
    # grows only after a few steps (here in step 3)
    result, state = _train(tmp_path, steps=4, optimizer_type="Prodigy", learning_rate=1.0, optimizer_args={"d0": 1e-6})
    group = state["param_groups"][0]
    assert group["d0"] == 1e-6 and group["d"] > 2 * group["d0"], group["d"]
    _assert_weights_moved(result)


def test_import_path_class_is_used(tmp_path, monkeypatch):
    made: list[torch.optim.Optimizer] = []

    class SpyRAdam(torch.optim.RAdam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps = 0
            made.append(self)

        def step(self, closure=None):
            self.steps += 1
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "RAdam", SpyRAdam)  # what the path "torch.optim.RAdam" now names
    result, state = _train(tmp_path, optimizer_type="torch.optim.RAdam")
    # one built by the trainer (after the config's trial construction), and it did the two steps
    assert [o.steps for o in made][-1] == 2 and "decoupled_weight_decay" in state["param_groups"][0]
    _assert_weights_moved(result)


@pytest.mark.parametrize("overrides, expected", [
    ({"optimizer_type": "AdamWW"}, "did you mean 'AdamW'?"),
    ({"optimizer_type": "Prodigy", "_hide": "prodigyopt"}, "needs the package 'prodigyopt'"),
    ({"optimizer_type": "torch.optim.lr_scheduler.LambdaLR"}, "is not an optimizer class"),
    ({"optimizer_args": {"weight_decy": 0.1}}, "'weight_decy' is not an argument of optimizer_type 'AdamW'"),
])
def test_bad_optimizer_refused_before_any_model_loads(tmp_path, monkeypatch, overrides, expected):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the optimizer was checked")

    monkeypatch.setattr(sd_loha.models, "load_pipeline", no_model)
    monkeypatch.setattr(train_loop, "load_pipeline", no_model, raising=False)
    overrides = dict(overrides)
    if "_hide" in overrides:
        monkeypatch.setitem(sys.modules, overrides.pop("_hide"), None)
    with pytest.raises(ConfigError) as ei:
        train(base_config(tmp_path / "out", **overrides), progress=False)
    assert "optimizer_type" in str(ei.value) and expected in str(ei.value)
    assert not (tmp_path / "out").exists()  # refused before the output folder was even made
