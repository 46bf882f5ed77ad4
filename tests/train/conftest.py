"""Trainer tests run with one intra-op thread.

The tiny models' ops are too small for intra-op parallelism to pay, and on a shared 2-core machine
a second OpenMP thread that waits at every op's barrier for a descheduled partner makes steps 10x
slower (measured: 0.57 s/step with 1 thread vs 7 s/step with 2 at load average 6).
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
