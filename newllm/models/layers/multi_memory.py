"""MultiMemoryLayer: `num_memories` independent Infini memories, read as an attention-weighted mix.

The block is InfiniLayer's (same projections, local attention, gate, MLP and parallel residual;
see `infini.py`); only the memory differs::

    write:  segment n (counted over the whole stream) -> memory n % M      (round-robin)
            M_m += phi(K)^T V   or the delta rule against M_m alone;  z_m += sum phi(k);  K_m += sum k
    read:   r_m   = phi(q) M_m / (phi(q) z_m + eps)                        each memory's read-out
            w_m   = softmax_m(rho_h * q . kbar_m / sqrt(Dm)),  kbar_m = K_m / (tokens in m)
            A_mem = sum_m w_m r_m
    output: A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_local      per attention head

(equations and guards: `newllm.models.ops.memory_mix`).

Why these choices:
* Round-robin writing is deterministic and independent of how the stream is split into calls, so
  one call equals any split; each memory holds every M-th segment, i.e. M interleaved views of
  the stream, and with the delta rule each memory only corrects its own contents, so what one
  memory stores is not overwritten by what the others absorb (a single linear memory of Dm
  dimensions holds about Dm associations; M memories about M * Dm). Routing a segment to its
  best-matching memory instead is left out on purpose: an argmax gets no gradient, and it can flip
  on a last-bit difference between one call and a split, breaking the contract for a whole write.
* The mix is attention over memories: the query against each memory's mean key (its summary), on
  the softmax-attention scale. A query whose content was written into memory m pulls its read
  mostly from m instead of averaging it with M - 1 unrelated read-outs. rho (one per memory head,
  learned, init `route_scale_init`) sets how sharp that choice is.
* Everything else (no positions, fp32 memory, NaN/Inf skip, clamp, gate beta per head with its own
  optimizer group) is InfiniLayer's, for the same reasons.

State (`MultiMemoryState`): the M memories (fp32), their z and key sums, the keys/values of the
current incomplete segment, and the counters; fixed size M * Hm * Dm * (Dm + 2) floats +
2 * (S - 1) * d, whatever the stream length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.base import check_positive, register_layer, resolve_config
from newllm.models.layers.infini import InfiniLayer, InfiniLayerConfig
from newllm.models.ops.memory_mix import MixtureState, init_mixture, mixture_scan


@dataclass
class MultiMemoryLayerConfig(InfiniLayerConfig):
    num_memories: int = 4  # M independent memories (seed 001 default)
    route_scale_init: float = 1.0  # initial rho: 1 = the plain attention scale q.kbar / sqrt(Dm)

    def __post_init__(self):
        super().__post_init__()
        check_positive(type(self).__name__, num_memories=self.num_memories, route_scale_init=self.route_scale_init)
        if self.num_memory_banks != 1:
            raise NewLLMError(f"{type(self).__name__}: num_memory_banks is an InfiniLayer option; use num_memories "
                              f"(got num_memory_banks={self.num_memory_banks})")


class MultiMemoryState(NamedTuple):
    """State of a MultiMemoryLayer (batch on dim 0, counters 0-dim)."""

    memory: torch.Tensor  # (B, M, Hm, Dm, Dm) fp32
    norm: torch.Tensor  # (B, M, Hm, Dm) fp32: z_m
    key_sum: torch.Tensor  # (B, M, Hm, Dm) fp32: K_m, sum of raw keys written into m
    segment_k: torch.Tensor  # (B, P, d): keys of the current incomplete segment, P < S
    segment_v: torch.Tensor  # (B, P, d)
    segments: torch.Tensor  # () int64: completed segments written
    skipped: torch.Tensor  # () int64: memory updates skipped for NaN/Inf


class MixtureLayerBase(InfiniLayer):
    """InfiniLayer's block with a pluggable memory (`memory_step`); shared by Multi/Hierarchical."""

    def __init__(self, config):
        super().__init__(config=config)
        Hm = config.memory_heads
        # rho = exp(log_rho) > 0, one per memory head; a gate-like scalar (own optimizer group)
        self.route_log_scale = nn.Parameter(torch.full((Hm,), math.log(config.route_scale_init)))

    @property
    def route_scale(self) -> torch.Tensor:
        return self.route_log_scale.exp()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"gates": [self.beta, self.route_log_scale]}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        M, Hm, Dm = c.num_memories, c.memory_heads, c.memory_dim
        return {"memory": (M, Hm, Dm, Dm), "norm": (M, Hm, Dm), "key_sum": (M, Hm, Dm)}

    def check_state(self, state, batch_size: int) -> None:
        c, name = self.config, type(self).__name__
        for field, want in self.state_shapes().items():
            t = getattr(state, field)
            if tuple(t.shape[1:]) != want or t.shape[0] != batch_size:
                raise NewLLMError(f"{name}: state {field} {tuple(t.shape)} does not fit "
                                  f"({batch_size}, {', '.join(map(str, want))})")
        p = state.segment_k.shape[1]
        if state.segment_k.shape[-1] != c.hidden_size or state.segment_v.shape != state.segment_k.shape \
                or p >= c.segment_length:
            raise NewLLMError(f"{name}: state segment_k {tuple(state.segment_k.shape)} / segment_v "
                              f"{tuple(state.segment_v.shape)} must be (batch, < {c.segment_length}, {c.hidden_size})")

    def mixture(self, state) -> MixtureState:
        return MixtureState(state.memory, state.norm, state.key_sum, state.segments, state.skipped)

    def scan_fine(self, q, k, v, state):
        """Round-robin memories: (A_fine (B, Hm, T, Dm), new MixtureState)."""
        c = self.config
        return mixture_scan(q, k, v, self.mixture(state), segment_length=c.segment_length,
                            route_scale=self.route_scale, delta_rule=c.use_delta_rule, scale=c.memory_scale,
                            eps=c.memory_eps, clamp=c.memory_update_clamp, check_finite=c.check_finite,
                            write_partial=False)


@register_layer("multi_memory")
class MultiMemoryLayer(MixtureLayerBase):
    config_class = MultiMemoryLayerConfig
    has_compressive_memory = True

    def __init__(self, *args, config: MultiMemoryLayerConfig | None = None, **kwargs):
        config = resolve_config(MultiMemoryLayerConfig, config, args, kwargs,
                                ("hidden_size", "num_attention_heads", "intermediate_size"))
        super().__init__(config)

    def init_state(self, batch_size: int, device=None, dtype=None) -> MultiMemoryState:
        c = self.config
        mix = init_mixture(batch_size, c.num_memories, c.memory_heads, c.memory_dim, c.memory_dim, device=device)
        empty = torch.zeros(batch_size, 0, c.hidden_size, device=device, dtype=dtype)
        return MultiMemoryState(mix.memory, mix.norm, mix.key_sum, empty, empty, mix.segments, mix.skipped)

    def memory_step(self, x, q, k, v, state):
        a_mem, mix = self.scan_fine(q, k, v, state)
        return a_mem, dict(memory=mix.memory, norm=mix.norm, key_sum=mix.key_sum, segments=mix.segments,
                           skipped=mix.skipped)
