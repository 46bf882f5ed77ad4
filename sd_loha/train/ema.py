"""Exponential moving average of the adapter weights, with diffusers' warm-up.

A fixed decay of 0.999 would keep the random initialisation in the average for thousands of steps, so
the decay grows with the number of updates t as in diffusers' ``EMAModel`` (``use_ema_warmup=False``):
the first update copies the weights, then decay_t = min(decay, (1 + t) / (10 + t)) where t counts the
updates before this one. The saved file, the samples and the validation loss all use the average
(:meth:`AdapterEMA.applied`), so what a run shows is what the file holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class AdapterEMA:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1 (exclusive), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        t = self.updates  # updates done so far
        if t == 0:
            return 0.0
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the live parameters for the block (samples, validation, saving);
        the raw ones are put back afterwards, bit for bit."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

    def state_dict(self) -> dict:
        return {"params": [s.clone() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for s, v in zip(self.shadow, state["params"]):
            s.copy_(v)
        # States written before the warm-up existed have no count: treat their average as long warmed up.
        self.updates = int(state.get("updates", 10**9))
