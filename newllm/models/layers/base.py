"""The layer contract, the capabilities every layer declares, and the registry of layer types.

Contract (DESIGN.md section 3)::

    y, new_state = layer(x, state=None)      # x, y: (B, T, d)

* `state` is a NamedTuple of tensors (or None for "nothing seen yet"); it is never mutated in
  place, so two models never share hidden state and gradients may flow into an initial state.
* Running a sequence in one call equals running it in pieces with the state carried.
* State tensors: a tensor with ndim >= 1 has the batch on dim 0; counters (positions, tokens
  absorbed) are 0-dim tensors. That lets the model shell broadcast a state taken at batch size 1
  to any batch size and save any state with safetensors.

Declared capabilities. What the rest of newllm may ask of a layer is declared here, with defaults,
and read only through these names (never found by `hasattr` or by probing with forward passes):

    state_type / state_spec()      the state's NamedTuple class and its fields' shapes and dtypes
    init_state(B) / check_state()  the empty state, and the one-line check of a given state
    tokens_absorbed(state)         how many tokens a state has absorbed (None: the layer cannot tell)
    has_compressive_memory         a fixed-size memory that a compact state file keeps
    memory_enabled                 the memory on/off switch (the memory-off ablation)
    gates() / token_gates()        gates to report: per-head values, and modules whose output is a
                                   per-token gate in [0, 1] (recorded with forward hooks)
    memory_segment_length          tokens per memory segment (None without a memory)
    uses_positions                 whether outputs depend on absolute positions (RoPE)
    attention_span                 how many tokens back an output can see other than through a
                                   compressive memory (W - 1 for a window of W, S - 1 for
                                   segment-local attention; None: unbounded). The model's
                                   `receptive_field` is their sum over the stack
    param_groups()                 parameters that want their own optimizer group (memory gates)
    tiny_config()                  a small config that exercises the layer, for tests

Adding a layer type: write a `BaseLayer` subclass with a config dataclass, decorate it with
`@register_layer("name")`, and import the module before building the model (for newllm's own
types, `layers/__init__.py` does). The conformance suite (`tests/models/test_conformance.py`)
runs over every registered type; `docs/architecture.md` walks through a toy example.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from newllm.config import ModelConfig, dataclass_from_dict
from newllm.errors import NewLLMError

LAYER_REGISTRY: dict[str, type["BaseLayer"]] = {}


def register_layer(name: str):
    """Class decorator: make a layer type buildable by name (`build_layer({"type": name, ...})`)."""

    def wrap(cls):
        if name in LAYER_REGISTRY and LAYER_REGISTRY[name] is not cls:
            raise NewLLMError(f"layer type {name!r} is registered twice")
        cls.layer_type = name
        LAYER_REGISTRY[name] = cls
        return cls

    return wrap


def build_layer(spec: dict[str, Any]) -> "BaseLayer":
    """Build a layer from `{"type": name, **config fields}` (the form stored in model configs)."""
    spec = dict(spec)
    name = spec.pop("type", None)
    if name not in LAYER_REGISTRY:
        raise NewLLMError(f"unknown layer type {name!r}; registered: {sorted(LAYER_REGISTRY)}")
    cls = LAYER_REGISTRY[name]
    return cls.from_config(dataclass_from_dict(cls.config_class, spec, where=f"layer type {name!r}"))


def check_layer_spec(spec: dict[str, Any], where: str, prefix: str = "", require: bool = False) -> dict[str, Any]:
    """`{"type": name, **fields}` with every field checked by the layer type's config class
    (`dataclass_from_dict`: types, ranges, the key named `prefix + key`); returns the full spec."""
    if not isinstance(spec, dict):
        raise NewLLMError(f"{where}: {prefix.rstrip('.')} must be a mapping, got {type(spec).__name__}")
    name = spec.get("type")
    if not isinstance(name, str) or name not in LAYER_REGISTRY:
        raise NewLLMError(f"{where}: {prefix}type {name!r} is not a registered layer type; registered: "
                          f"{sorted(LAYER_REGISTRY)}")
    fields = {k: v for k, v in spec.items() if k != "type"}
    config = dataclass_from_dict(LAYER_REGISTRY[name].config_class, fields, where, prefix, require=require)
    return {"type": name, **dataclasses.asdict(config)}


def model_config_from_dict(d: dict[str, Any], where: str, require: bool = False) -> ModelConfig:
    """A `ModelConfig` from a mapping (a `newllm.json` config), every layer spec checked by its layer
    type's config class first (`check_layer_spec`). `require=True` (a config newllm wrote, which lists
    every field) makes a missing model or layer field an error, never a default."""
    if isinstance(d, dict) and isinstance(d.get("layers"), list):
        d = {**d, "layers": [check_layer_spec(spec, where, f"layers[{i}].", require) for i, spec in enumerate(d["layers"])]}
    return dataclass_from_dict(ModelConfig, d, where, require=require)


class StateField(NamedTuple):
    """One tensor of a layer's state, as `state_spec()` declares it."""

    shape: tuple[int | None, ...]  # after the batch dim; None: a dim that grows with the stream
    dtype: torch.dtype | None = None  # None: the dtype the layer computes in
    batched: bool = True  # False: a 0-dim counter shared by the batch (shape must be ())


def empty_state(state_type, spec: dict[str, StateField], batch_size: int, device=None, dtype=None):
    """The state of nothing seen: zeros, every growing dim of length 0, counters 0."""
    dtype = dtype or torch.get_default_dtype()
    tensors = []
    for f in spec.values():
        shape = ((batch_size,) if f.batched else ()) + tuple(0 if n is None else n for n in f.shape)
        tensors.append(torch.zeros(shape, dtype=f.dtype or dtype, device=device))
    return state_type(*tensors)


def check_state_fields(where: str, spec: dict[str, StateField], state, batch_size: int | None = None) -> None:
    """Raise a one-line NewLLMError naming the first tensor of `state` that does not fit `spec`:
    field names, rank, floating vs integer, every fixed dim, one batch size for all."""
    fields = tuple(getattr(state, "_fields", ()))
    if fields != tuple(spec):
        raise NewLLMError(f"{where}: state has fields {list(fields)}, the layer's state has {list(spec)}")
    batch = batch_size
    for (name, f), t in zip(spec.items(), state):
        want = ("batch",) * f.batched + tuple("any" if n is None else n for n in f.shape)
        if not isinstance(t, torch.Tensor) or t.dim() != len(want):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise NewLLMError(f"{where}: tensor {name!r} has shape {got}, the layer expects {len(want)} dims "
                              f"({', '.join(map(str, want))})")
        if t.dtype.is_floating_point != (f.dtype or torch.float32).is_floating_point:
            raise NewLLMError(f"{where}: tensor {name!r} is {t.dtype}, the layer keeps "
                              f"{'a floating' if (f.dtype or torch.float32).is_floating_point else 'an integer'} tensor")
        for dim, n in enumerate(f.shape, start=int(f.batched)):
            if n is not None and t.shape[dim] != n:
                raise NewLLMError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, this model's layer needs "
                                  f"size {n} in dim {dim}")
        if f.batched:
            if batch is not None and t.shape[0] != batch:
                raise NewLLMError(f"{where}: tensor {name!r} has batch size {t.shape[0]}, expected {batch}")
            batch = t.shape[0]


class BaseLayer(nn.Module):
    """Base class of every layer type: the contract and the declared capabilities (module doc)."""

    layer_type: ClassVar[str] = "base"
    config_class: ClassVar[type] = object
    #: True for layers whose state is a fixed-size compressive memory (kept by compact state files)
    has_compressive_memory: ClassVar[bool] = False
    #: the NamedTuple class of the state; None for a layer that keeps no state
    state_type: ClassVar[type | None] = None

    def __init__(self, config):
        super().__init__()
        self.config = config

    @classmethod
    def from_config(cls, config) -> "BaseLayer":
        return cls(config=config)

    #: options worth exercising in tests (segments, banks, GQA), on top of tiny_config's small sizes
    tiny_options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def tiny_config(cls):
        """A small config for tests: the sizes below for whichever of these fields the config has,
        plus the class's `tiny_options`."""
        small = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        return cls.config_class(**{k: v for k, v in small.items() if k in names}, **cls.tiny_options)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def spec(self) -> dict[str, Any]:
        """JSON-able description `{"type": ..., **config}`; `build_layer(spec)` rebuilds the layer."""
        return {"type": self.layer_type, **dataclasses.asdict(self.config)}

    # ------------------------------------------------------------------ state
    def state_spec(self) -> dict[str, StateField]:
        """Field name -> StateField of the state NamedTuple (empty for a stateless layer)."""
        return {}

    def init_state(self, batch_size: int, device=None, dtype=None):
        """The state of nothing seen (None for a stateless layer); `model(x)` with no state equals
        `model(x, state=init_state)`."""
        if self.state_type is None:
            return None
        return empty_state(self.state_type, self.state_spec(), batch_size, device, dtype)

    def check_state(self, state, batch_size: int | None = None) -> None:
        """Raise a one-line NewLLMError if `state` does not fit this layer (see check_state_fields)."""
        if self.state_type is None:
            raise NewLLMError(f"{type(self).__name__} keeps no state, got a {type(state).__name__}")
        check_state_fields(type(self).__name__, self.state_spec(), state, batch_size)

    def tokens_absorbed(self, state) -> int | None:
        return None

    # ------------------------------------------------------------------ memory
    @property
    def memory_enabled(self) -> bool:
        return False

    @memory_enabled.setter
    def memory_enabled(self, enabled: bool) -> None:
        raise NewLLMError(f"{type(self).__name__} has no memory to switch {'on' if enabled else 'off'}")

    @property
    def memory_segment_length(self) -> int | None:
        return None

    def gates(self) -> dict[str, torch.Tensor]:
        """Gate values to report (detached, fp32), e.g. {"memory": sigmoid(beta) per head}."""
        return {}

    def token_gates(self) -> dict[str, nn.Module]:
        """Modules whose forward output is a per-token gate in [0, 1], by name."""
        return {}

    @property
    def uses_positions(self) -> bool:
        return False

    @property
    def attention_span(self) -> int | None:
        """The most tokens back that the output at t depends on, other than through a compressive
        memory: the output at t is a function of inputs t - span .. t (and of the memory). None: no
        bound (full attention, a recurrent state, a layer that does not declare one)."""
        return None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters that want their own optimizer group (e.g. memory gates), by group name."""
        return {}


#: short names accepted wherever a config field is (the seed writes `PythiaLayer(512, num_heads=8)`)
ALIASES = {"num_heads": "num_attention_heads", "d_model": "hidden_size"}
#: what the seed's constructors take positionally: `InfiniLayer(512, 8, 2048)`
POSITIONAL = ("hidden_size", "num_attention_heads", "intermediate_size")


def resolve_config(config_class, config, args: tuple, kwargs: dict, positional: tuple[str, ...] = POSITIONAL):
    """Shared constructor logic: `Layer(config=cfg)` or `Layer(512, 8, 2048, option=...)`."""
    if config is not None:
        if args or kwargs:
            raise NewLLMError(f"{config_class.__name__}: pass either config= or arguments, not both")
        return config
    if len(args) > len(positional):
        raise NewLLMError(f"{config_class.__name__}: at most {len(positional)} positional arguments {positional}")
    values = dict(zip(positional, args))
    for key, value in kwargs.items():
        key = ALIASES.get(key, key)
        if key in values:
            raise NewLLMError(f"{config_class.__name__}: {key} given twice")
        values[key] = value
    return dataclass_from_dict(config_class, values, where=config_class.__name__)


def check_positive(owner: str, **values) -> None:
    for key, value in values.items():
        if value is None or value <= 0:
            raise NewLLMError(f"{owner}: {key} must be > 0, got {value}")
