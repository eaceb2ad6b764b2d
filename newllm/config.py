"""Model configuration: the source of truth for every number the model code uses.

A `ModelConfig` holds the model-level fields (vocabulary, final norm, head tying, dtype) and one
layer spec per layer (`{"type": "pythia", "hidden_size": 512, ...}`), so a checkpoint's config
rebuilds any stack, including user-registered layer types. Field names follow Hugging Face's
where one exists.

Also here, because every config uses them: `dataclass_from_dict` (a config dataclass from a nested
mapping, unknown keys refused) and the dtype table (`DTYPES`, `DTYPE_NAMES`, `MODEL_DTYPES`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from newllm.errors import NewLLMError

#: every dtype newllm writes or reads by name (configs, checkpoint headers, memory-state files)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
#: the dtypes a model's weights (`ModelConfig.dtype`) and cached hidden states may have: the floating
#: dtypes of at most 32 bits (float32, float16, bfloat16)
MODEL_DTYPES: tuple[str, ...] = tuple(n for n, t in DTYPES.items() if t.is_floating_point and t.itemsize <= 4)
NORMS = ("layernorm", "rmsnorm")

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], d: dict[str, Any], where: str, _prefix: str = "") -> T:
    """`cls(**d)` for a config dataclass, with errors a user can act on.

    A field whose type is itself a dataclass (`TrainConfig.data: DataConfig`) is built from its
    sub-mapping the same way. Every error is one `NewLLMError` line starting with `where` (the file or
    section the mapping came from): a key that is not a field (named dotted, `eval.everyy`, with the
    known keys), a section that is not a mapping, a value the dataclass's own checks refuse.
    """
    if not isinstance(d, dict):
        raise NewLLMError(f"{where}: {_prefix.rstrip('.') or 'top level'} must be a mapping, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise NewLLMError(f"{where}: unknown key(s) {[_prefix + k for k in unknown]}; known: {sorted(names)}")
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # an annotation that cannot be resolved is no nested dataclass
        hints = {}
    kwargs = {}
    for key, value in d.items():
        sub = hints.get(key)
        nested = isinstance(sub, type) and dataclasses.is_dataclass(sub)
        kwargs[key] = dataclass_from_dict(sub, value, where, f"{_prefix}{key}.") if nested else value
    try:
        return cls(**kwargs)
    except NewLLMError as e:
        msg = str(e)
        raise NewLLMError(msg if msg.startswith(f"{where}:") else f"{where}: {msg}") from None
    except TypeError as e:
        raise NewLLMError(f"{where}: {_prefix.rstrip('.') or cls.__name__}: {e}") from None


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
        if self.dtype not in MODEL_DTYPES:
            raise NewLLMError(f"ModelConfig: dtype must be one of {sorted(MODEL_DTYPES)}, got {self.dtype!r}")
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
    def from_dict(cls, d: dict[str, Any], where: str = "ModelConfig") -> "ModelConfig":
        return dataclass_from_dict(cls, d, where)

    def fingerprint(self) -> str:
        """Short hash of everything that decides the shapes and meaning of states and weights."""
        d = self.to_dict()
        for key in ("name", "dtype", "initializer_range"):
            d.pop(key)
        for spec in d["layers"]:
            spec.pop("initializer_range", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
