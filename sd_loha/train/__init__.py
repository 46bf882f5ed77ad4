"""Training a LoHA adapter: config (every option and its checks) → loop (`train()` and the `Trainer` recipe:
setup, loss step, optimizer step, validation, samples, saves) → state (resumable saves) → report (sample
grids, loss curve); events are what a caller sees while it runs.

    from sd_loha.train import train
    result = train("train_configs/demo.toml")   # or a dict of options, or a TrainConfig
"""

from .config import TrainConfig, as_config
from .loop import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "as_config", "train"]
