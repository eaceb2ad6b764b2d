"""`NewLLMConfig`: a newllm `ModelConfig` as a `transformers` configuration (`model_type="newllm"`).

The whole newllm config travels in one field, `newllm_config` (the `ModelConfig.to_dict()` mapping:
model fields plus one spec per layer). It is type-checked back into the dataclass whenever a config is
built or read (`model_config_from_dict(..., require=True)`: every model and layer field present, of
its type and in its range; a bad `config.json` is one `NewLLMError` naming the key). The standard
fields other tools read (`vocab_size`, `hidden_size`, `num_hidden_layers`, `max_position_embeddings`,
`bos_token_id`, `eos_token_id`, `tie_word_embeddings`) are mirrored from it: left unset they are filled
in, given (a `config.json` edited by hand) they must agree with it, or the config is refused, since
the model is built from `newllm_config` alone and a disagreeing mirror would describe another model.

`NewLLMConfig()` with no `newllm_config` exists only because transformers builds one to learn the
defaults when it writes a config; a model cannot be built from it.
"""
from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from newllm.config import ModelConfig
from newllm.errors import NewLLMError
from newllm.models.layers.base import model_config_from_dict

#: the standard transformers fields mirrored from the newllm config
MIRRORED = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "bos_token_id",
            "eos_token_id", "tie_word_embeddings")


def mirrored_fields(config: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "max_position_embeddings": config.max_position_embeddings,
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "tie_word_embeddings": config.tie_word_embeddings}


class NewLLMConfig(PreTrainedConfig):
    """A newllm model's config for `transformers` (module doc). Build it with
    `NewLLMConfig.from_model_config(model.config)`, or let `newllm.hf.to_hf(model)` do it."""

    model_type = "newllm"

    newllm_config: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool | None = None
    use_cache: bool = True  # generate carries the per-layer state (KV caches, memories) between steps

    def __post_init__(self, **kwargs):
        if self.newllm_config is not None:
            model_config = model_config_from_dict(self.newllm_config, "NewLLMConfig.newllm_config", require=True)
            self.newllm_config = model_config.to_dict()
            for key, value in mirrored_fields(model_config).items():
                given = getattr(self, key)
                if given is not None and (given != value or type(given) is not type(value)):
                    raise NewLLMError(f"NewLLMConfig: {key} is {given!r} but newllm_config says {value!r}; the model "
                                      f"is built from newllm_config, so the two must agree")
                setattr(self, key, value)
        super().__post_init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> "NewLLMConfig":
        if not isinstance(config, ModelConfig):
            raise NewLLMError(f"NewLLMConfig.from_model_config: expected a newllm ModelConfig, got "
                              f"{type(config).__name__}")
        return cls(newllm_config=config.to_dict(), dtype=config.dtype, **kwargs)

    @property
    def model_config(self) -> ModelConfig:
        """The newllm `ModelConfig` (checked again: the dict may have been changed since)."""
        if self.newllm_config is None:
            raise NewLLMError("NewLLMConfig has no newllm_config (a default-constructed config describes no model); "
                              "build it with NewLLMConfig.from_model_config(model.config)")
        return model_config_from_dict(self.newllm_config, "NewLLMConfig.newllm_config", require=True)
