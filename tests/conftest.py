import os

# Tests never download: a hub access is a bug, and offline mode makes it fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline factory: tiny_pipe("tiny-sdxl")."""
    from sd_loha.models import build_tiny_pipeline

    return build_tiny_pipeline


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test, restored afterwards (for modules of tiny tensors, where a
    second OpenMP thread only waits at every op's barrier)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
