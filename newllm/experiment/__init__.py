"""The comparison experiment (`scripts/experiment.py`, `newllm experiment`): see run.py."""
from newllm.experiment.config import ExperimentConfig, load_experiment_config
from newllm.experiment.run import run_experiment

__all__ = ["ExperimentConfig", "load_experiment_config", "run_experiment"]
