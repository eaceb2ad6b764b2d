"""ParallelAdapter: a pretrained layer and a new one side by side, y = original(x) + alpha * (new(x) - x).

Seed 002's parallel adapter `original(x) + alpha * new(x)`. Both layers are whole blocks that carry
the residual stream (y = x + ...), so the new branch adds what the new layer would add to the
stream, `new(x) - x`, scaled by one learned scalar alpha (init `alpha_init`; the seed's 0 makes the
adapted model compute exactly the original's outputs at step 0, bit for bit). alpha is in the
"gates" optimizer group (its own learning rate, no weight decay).

Why the seed's alpha "was not learned": at alpha = 0 the new branch's parameters get zero gradient
(every path from them to the loss is multiplied by alpha); only alpha itself gets one,
d loss / d alpha = sum (new(x) - x) . d loss / d y. So alpha has to move first, at its own learning
rate, before the new layer can learn anything; with the base learning rate (AdamW moves a
parameter by about lr per step) it barely moves, and neither does the new layer.

State: the two layers' states side by side, one NamedTuple (`ParallelAdapterState`) whose fields are
the original's prefixed `original_` and the new layer's prefixed `new_`; both must keep a state.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.base import LAYER_REGISTRY, BaseLayer, StateField, build_layer, register_layer


@dataclass
class ParallelAdapterConfig:
    original: dict[str, Any] = field(default_factory=dict)  # the pretrained layer's spec ({"type": ..., ...})
    new: dict[str, Any] = field(default_factory=dict)  # the new layer's spec
    alpha_init: float = 0.0  # the seed's 0: the adapter starts as the original, exactly
    hidden_size: int = 0  # the stream width both layers share (0: taken from `original`)

    def __post_init__(self):
        for name in ("original", "new"):
            spec = getattr(self, name)
            if not isinstance(spec, dict) or spec.get("type") not in LAYER_REGISTRY:
                raise NewLLMError(f"ParallelAdapter: {name} must be a layer spec with a registered 'type', got "
                                  f"{spec.get('type') if isinstance(spec, dict) else type(spec).__name__!r}")
        widths = {self.original.get("hidden_size"), self.new.get("hidden_size")}
        if len(widths) != 1:
            raise NewLLMError(f"ParallelAdapter: original and new layers differ in hidden_size {sorted(map(str, widths))}")
        if not self.hidden_size:
            self.hidden_size = self.original["hidden_size"]
        if self.hidden_size != self.original["hidden_size"]:
            raise NewLLMError(f"ParallelAdapter: hidden_size {self.hidden_size} != the layers' {self.original['hidden_size']}")


@register_layer("parallel_adapter")
class ParallelAdapter(BaseLayer):
    config_class = ParallelAdapterConfig

    def __init__(self, original: BaseLayer | None = None, new: BaseLayer | None = None, alpha_init: float = 0.0, *,
                 config: ParallelAdapterConfig | None = None):
        if config is None:
            if original is None or new is None:
                raise NewLLMError("ParallelAdapter: pass original= and new= layers, or config=")
            config = ParallelAdapterConfig(original.spec(), new.spec(), alpha_init)
        elif original is not None or new is not None:
            raise NewLLMError("ParallelAdapter: pass either layers or config=, not both")
        super().__init__(config)
        self.original = original if original is not None else build_layer(config.original)
        self.new = new if new is not None else build_layer(config.new)
        self.alpha = nn.Parameter(torch.tensor(float(config.alpha_init)))
        for part in (self.original, self.new):
            if part.state_type is None:
                raise NewLLMError(f"ParallelAdapter: {type(part).__name__} keeps no state; both layers must")
        self.state_type = collections.namedtuple(
            "ParallelAdapterState", [f"original_{f}" for f in self.original.state_type._fields]
            + [f"new_{f}" for f in self.new.state_type._fields])

    @classmethod
    def tiny_config(cls) -> ParallelAdapterConfig:
        # a pythia layer beside an Infini layer, alpha 0.5 so that both branches get gradients
        original = {"type": "pythia", **LAYER_REGISTRY["pythia"].tiny_config().__dict__}
        new = {"type": "infini", **LAYER_REGISTRY["infini"].tiny_config().__dict__}
        return ParallelAdapterConfig(original, new, alpha_init=0.5)

    def split(self, state):
        n = len(self.original.state_type._fields)
        return self.original.state_type(*state[:n]), self.new.state_type(*state[n:])

    def forward(self, x: torch.Tensor, state=None):
        s_orig, s_new = (None, None) if state is None else self.split(state)
        y, s_orig = self.original(x, s_orig)
        y_new, s_new = self.new(x, s_new)
        y = y + self.alpha.to(y.dtype) * (y_new - x)  # alpha = 0: exactly the original's y
        return y, self.state_type(*s_orig, *s_new)

    # ------------------------------------------------------------------ capabilities
    def state_spec(self) -> dict[str, StateField]:
        return {**{f"original_{k}": v for k, v in self.original.state_spec().items()},
                **{f"new_{k}": v for k, v in self.new.state_spec().items()}}

    def tokens_absorbed(self, state) -> int | None:
        return self.original.tokens_absorbed(self.split(state)[0])

    @property
    def has_compressive_memory(self) -> bool:  # the new branch's memory lives in this layer's state
        return self.new.has_compressive_memory

    @property
    def memory_enabled(self) -> bool:
        return self.new.memory_enabled

    @memory_enabled.setter
    def memory_enabled(self, enabled: bool) -> None:
        self.new.memory_enabled = enabled

    @property
    def memory_segment_length(self) -> int | None:
        return self.new.memory_segment_length

    def gates(self) -> dict[str, torch.Tensor]:
        return {"alpha": self.alpha.detach().float().view(1), **{f"new.{k}": v for k, v in self.new.gates().items()}}

    def token_gates(self) -> dict[str, nn.Module]:
        return {f"new.{k}": v for k, v in self.new.token_gates().items()}

    @property
    def uses_positions(self) -> bool:
        return self.original.uses_positions or self.new.uses_positions

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {k: list(v) for k, v in self.new.param_groups().items()}
        groups["gates"] = [self.alpha, *groups.get("gates", [])]
        return groups
