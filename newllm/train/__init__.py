"""Training: `TrainConfig` recipes, the `Trainer` loop, resumable checkpoints, metrics.

    from newllm.train import load_config, train
    train(load_config("configs/pythia_wikitext2_cpu.yaml", ["max_steps=100"]))
"""
from newllm.train.config import TrainConfig, apply_overrides, load_config
from newllm.train.loop import Trainer, TrainingDiverged
from newllm.train.run import train

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "apply_overrides", "load_config", "train"]
