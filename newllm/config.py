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
import math
import types
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


def describe_type(hint) -> str:
    """`int | None` -> "an integer or null", for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"a list, each item {describe_type(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return f"one of {list(args)}"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null", dict: "a mapping", list: "a list"}.get(hint, getattr(hint, "__name__", str(hint)))


class _Mismatch(Exception):
    pass


def check_value(value: Any, hint: Any, name: str) -> Any:
    """`value` checked against the type annotation `hint` (the one rule for every field read from a
    file, a flag or a keyword): returns the value, an int as float for a float field and an integral
    float as int for an int field (1e6 -> 1000000; nothing else changes); anything else that does
    not fit (a string for a number, 64.5 for an int, a bool for a number, NaN, a string for a list)
    raises `NewLLMError` "{name} must be ..., got ...". Annotations it does not know (Any, classes)
    pass the value through."""
    try:
        return _check(value, hint)
    except _Mismatch:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise NewLLMError(f"{name} must be {describe_type(hint)}, got {shown}") from None


def _check(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a)
            except _Mismatch:
                pass
        raise _Mismatch
    if hint is type(None):
        if value is not None:
            raise _Mismatch
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if hint is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        if not math.isfinite(float(value)):
            raise _Mismatch
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise _Mismatch
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_check(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [_check(v, inner) for v in value]
        return tuple(out) if (origin or hint) is tuple else out
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        kt, vt = args if args else (Any, Any)
        return {_check(k, kt): _check(v, vt) for k, v in value.items()}
    return value


def dataclass_from_dict(cls: type[T], d: dict[str, Any], where: str, _prefix: str = "",
                        require: bool = False) -> T:
    """`cls(**d)` for a config dataclass, with errors a user can act on: the one way every config
    dataclass is built from a file, a flag or keywords.

    A field whose type is itself a dataclass (`TrainConfig.data: DataConfig`) is built from its
    sub-mapping the same way. Every value is checked against its field's annotation first
    (`check_value`: types, finite numbers, no silent rounding), so the dataclass's own range checks
    never see a string or a NaN. Every error is one `NewLLMError` line starting with `where` (the file
    or section the mapping came from) and naming the key (dotted, `eval.everyy`): a key that is not a
    field (with the known keys), a value of the wrong type, a section that is not a mapping, a value
    the dataclass's own checks refuse. `require=True` (a spec stored in a file, which newllm writes in
    full) makes a missing field an error instead of taking its default.
    """
    if not isinstance(d, dict):
        raise NewLLMError(f"{where}: {_prefix.rstrip('.') or 'top level'} must be a mapping, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(map(str, set(d) - set(names)))
    if unknown:
        raise NewLLMError(f"{where}: unknown key(s) {[_prefix + k for k in unknown]}; known: {sorted(names)}")
    if require:
        missing = [n for n in names if n not in d]
        if missing:
            raise NewLLMError(f"{where}: {_prefix.rstrip('.') or cls.__name__} lacks key(s) "
                              f"{[_prefix + k for k in missing]}")
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # an annotation that cannot be resolved is no nested dataclass
        hints = {}
    kwargs = {}
    for key, value in d.items():
        sub = hints.get(key, Any)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            kwargs[key] = dataclass_from_dict(sub, value, where, f"{_prefix}{key}.")
            continue
        try:
            kwargs[key] = check_value(value, sub, f"{_prefix}{key}")
        except NewLLMError as e:
            raise NewLLMError(f"{where}: {e}") from None
    try:
        return cls(**kwargs)
    except NewLLMError as e:
        msg = str(e)
        raise NewLLMError(msg if msg.startswith(f"{where}:") else f"{where}: {msg}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
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
        if not self.norm_eps > 0:
            raise NewLLMError(f"ModelConfig: norm_eps must be > 0, got {self.norm_eps}")
        if self.max_position_embeddings is not None and self.max_position_embeddings <= 0:
            raise NewLLMError(f"ModelConfig: max_position_embeddings must be > 0 or null, got "
                              f"{self.max_position_embeddings}")
        for key in ("bos_token_id", "eos_token_id"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise NewLLMError(f"ModelConfig: {key} must be >= 0 or null, got {getattr(self, key)}")
        if not all(isinstance(spec, dict) for spec in self.layers):
            raise NewLLMError("ModelConfig: every layer spec must be a mapping {type: ..., hidden_size: ...}")
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

    def fingerprint(self) -> str:
        """Short hash of everything that decides the shapes and meaning of states and weights."""
        d = self.to_dict()
        for key in ("name", "dtype", "initializer_range"):
            d.pop(key)
        for spec in d["layers"]:
            spec.pop("initializer_range", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
