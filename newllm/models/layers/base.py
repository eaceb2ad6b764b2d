"""The layer contract and the registry of layer types.

Contract (DESIGN.md section 3)::

    y, new_state = layer(x, state=None)      # x, y: (B, T, d)

* `state` is a NamedTuple of tensors (or None for "nothing seen yet"); it is never mutated in
  place, so two models never share hidden state and gradients may flow into an initial state.
* Running a sequence in one call equals running it in pieces with the state carried.
* Convention for state tensors: a tensor with ndim >= 1 has the batch on dim 0; counters
  (positions, tokens absorbed) are 0-dim tensors. That convention lets the model shell broadcast a
  state taken at batch size 1 to any batch size and save any state with safetensors.

Adding a layer type: write one file with a `BaseLayer` subclass and a config dataclass, decorate
the class with `@register_layer("name")`, and import the file in `layers/__init__.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

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
    return cls.from_config(cls.config_class(**spec))


class KVCache(NamedTuple):
    """State of a softmax-attention layer: keys/values seen so far and the next position.

    k, v: (B, hkv, Tc, Dh), already rotated (RoPE applied) so they are reused as they are;
    pos: 0-dim int64 tensor, the absolute position of the next token. With a sliding window W only
    the last W-1 keys are kept (all a future query can see).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor


class BaseLayer(nn.Module):
    """Base class of every layer type; see the module docstring for the contract."""

    layer_type: ClassVar[str] = "base"
    config_class: ClassVar[type] = object
    #: True for layers whose state is a compressive memory (exported by `compact` memory states)
    has_compressive_memory: ClassVar[bool] = False

    def __init__(self, config):
        super().__init__()
        self.config = config

    @classmethod
    def from_config(cls, config) -> "BaseLayer":
        return cls(config=config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def spec(self) -> dict[str, Any]:
        """JSON-able description `{"type": ..., **config}`; `build_layer(spec)` rebuilds the layer."""
        return {"type": self.layer_type, **dataclasses.asdict(self.config)}

    def forward(self, x: torch.Tensor, state=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters that want their own optimizer group (e.g. memory gates), by group name."""
        return {}


#: short names accepted wherever a config field is (the seed writes `PythiaLayer(512, num_heads=8)`)
ALIASES = {"num_heads": "num_attention_heads", "d_model": "hidden_size"}


def resolve_config(config_class, config, args: tuple, kwargs: dict, positional: tuple[str, ...]):
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
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise NewLLMError(f"{config_class.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
    return config_class(**values)


def check_positive(owner: str, **values) -> None:
    for key, value in values.items():
        if value is None or value <= 0:
            raise NewLLMError(f"{owner}: {key} must be > 0, got {value}")


def extend_kv_cache(
    state: KVCache | None, k: torch.Tensor, v: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, KVCache]:
    """Prepend the cache to this call's k/v. Returns (k_all, v_all, k_start, new_state)."""
    if state is None:
        k_all, v_all, start = k, v, 0
    else:
        k_all = torch.cat((state.k.to(k.dtype), k), dim=-2)
        v_all = torch.cat((state.v.to(v.dtype), v), dim=-2)
        start = int(state.pos) - state.k.shape[-2]
    pos = start + k_all.shape[-2]
    keep_k, keep_v = k_all, v_all
    if window is not None:
        keep = max(window - 1, 0)
        keep_k = k_all[..., k_all.shape[-2] - min(keep, k_all.shape[-2]):, :]
        keep_v = v_all[..., v_all.shape[-2] - keep_k.shape[-2]:, :]
    new_state = KVCache(keep_k, keep_v, torch.tensor(pos, dtype=torch.long))
    return k_all, v_all, start, new_state
