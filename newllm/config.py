"""Model configuration: the source of truth for every number the model code uses.

A `ModelConfig` holds the model-level fields (vocabulary, final norm, head tying, dtype) and one
layer spec per layer (`{"type": "pythia", "hidden_size": 512, ...}`), so a checkpoint's config
rebuilds any stack, including user-registered layer types. Field names follow Hugging Face's
where one exists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from newllm.errors import NewLLMError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NORMS = ("layernorm", "rmsnorm")


@dataclass
class ModelConfig:
    vocab_size: int = 50304  # Pythia's padded GPT-NeoX vocabulary
    layers: list[dict[str, Any]] = field(default_factory=list)  # one spec per layer, see module doc
    norm: str = "layernorm"  # final norm: "layernorm" (GPT-NeoX) or "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False  # Pythia: separate embed_out; Llama-small models: tied
    max_position_embeddings: int | None = 2048  # longest context the model was built for; None = no limit
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"
    name: str | None = None  # preset or source the model came from (informational)
    # recurrent models only: options of the h_{t-1} feedback (newllm.models.context.ContextConfig);
    # None = an ordinary TransformerLM
    context_feedback: dict[str, Any] | None = None

    def __post_init__(self):
        if self.vocab_size is None or self.vocab_size <= 0:
            raise NewLLMError(f"ModelConfig: vocab_size must be > 0, got {self.vocab_size}")
        if not self.layers:
            raise NewLLMError("ModelConfig: a model needs at least one layer")
        if self.norm not in NORMS:
            raise NewLLMError(f"ModelConfig: norm must be one of {NORMS}, got {self.norm!r}")
        if self.dtype not in DTYPES:
            raise NewLLMError(f"ModelConfig: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        sizes = {spec.get("hidden_size") for spec in self.layers}
        if len(sizes) != 1:
            raise NewLLMError(f"ModelConfig: all layers must share hidden_size, got {sorted(map(str, sizes))}")

    @property
    def hidden_size(self) -> int:
        return self.layers[0]["hidden_size"]

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise NewLLMError(f"ModelConfig: unknown field(s) {unknown}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Short hash of everything that decides the shapes and meaning of states and weights."""
        d = self.to_dict()
        for key in ("name", "dtype", "initializer_range"):
            d.pop(key)
        for spec in d["layers"]:
            spec.pop("initializer_range", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
