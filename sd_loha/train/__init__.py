"""Training a LoHA adapter: config (every option and its checks) → loop (the run, top to bottom) →
state (resumable saves) → report (sample grids, loss curve).

    from sd_loha.train import train
    result = train("train_configs/demo.toml")   # or a dict of options, or a TrainConfig
"""

from .config import TrainConfig, as_config
from .loop import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "as_config", "train"]
