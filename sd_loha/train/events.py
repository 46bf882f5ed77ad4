"""Progress events of a training run, as typed records.

`train(on_event=...)` calls its callback with one of these after each thing worth showing (the web UI's live
view is built from them). They are plain frozen dataclasses: match on the class, read the fields;
`to_dict()` gives a JSON-ready form with a "type" key for logs and HTTP APIs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Preflight(Event):
    """The dataset was scanned; `report` is `PreflightReport.to_dict()`, `text` its printed form."""

    kind: ClassVar[str] = "preflight"
    report: dict[str, Any]
    text: str


@dataclass(frozen=True)
class MemoryEstimate(Event):
    """The device memory the run will need (sd_loha.train.memory): `report` is `MemoryEstimate.to_dict()`,
    `text` its printed form; `fits` is None where there is no device memory to compare with (the CPU)."""

    kind: ClassVar[str] = "memory"
    report: dict[str, Any]
    text: str
    fits: bool | None


@dataclass(frozen=True)
class Caching(Event):
    """Latent caching progress: `done` of `total` images encoded."""

    kind: ClassVar[str] = "caching"
    done: int
    total: int


@dataclass(frozen=True)
class Progress(Event):
    """One optimizer step finished."""

    kind: ClassVar[str] = "progress"
    step: int
    total: int
    epoch: int  # 1-based, the epoch this step belongs to
    loss: float
    lr: float
    it_s: float
    eta_s: float


@dataclass(frozen=True)
class Validation(Event):
    kind: ClassVar[str] = "validation"
    step: int
    loss: float


@dataclass(frozen=True)
class Sample(Event):
    """A sample grid was written (the weights the saved file holds: EMA when EMA is on)."""

    kind: ClassVar[str] = "sample"
    path: str
    step: int


@dataclass(frozen=True)
class Saved(Event):
    """An adapter file was written."""

    kind: ClassVar[str] = "saved"
    path: str
    step: int


@dataclass(frozen=True)
class Done(Event):
    kind: ClassVar[str] = "done"
    output: str | None
    stopped: bool
    step: int


EVENT_TYPES: tuple[type[Event], ...] = (Preflight, MemoryEstimate, Caching, Progress, Validation, Sample, Saved, Done)
