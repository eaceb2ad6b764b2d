"""Models: the generic `TransformerLM`, layer types, presets."""
from newllm.models.model import LMOutput, TransformerLM
from newllm.models.presets import PRESETS, create_model, preset_config, register_preset

__all__ = ["LMOutput", "TransformerLM", "PRESETS", "create_model", "preset_config", "register_preset"]
