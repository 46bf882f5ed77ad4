"""Optimizers by name and the LR schedules' options."""

from __future__ import annotations

import math

import pytest
import torch

from sd_loha.train.optim import OptimizerError, make_optimizer, make_scheduler


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


def test_optimizer_names():
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
    assert type(make_optimizer("adamw", params, 1e-3)).__name__ == "AdamW"
    assert type(make_optimizer("SGD", params, 1e-3, {"momentum": 0.9})).__name__ == "SGD"
    with pytest.raises(OptimizerError, match="did you mean 'AdamW'"):
        make_optimizer("AdamWW", params, 1e-3)
