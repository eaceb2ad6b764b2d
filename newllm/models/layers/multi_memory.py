"""MultiMemoryLayer: `num_memories` independent Infini memories, read as an attention-weighted mix.

The block and mixer are InfiniLayer's (`blocks.Block`, `memory.MemoryMixer`: projections, local
attention, gate beta, MLP, residual; `block="neox"` or `"llama"`). This file is the memory::

    (M1) write:  segment n (counted over the whole stream) -> memory n % M      (round-robin)
                 M_m += phi(K)^T V or the delta rule against M_m alone;  z_m += sum phi(k);  K_m += sum k
    (M2) read:   r_m   = phi(q) M_m / (phi(q) z_m + eps)                        each memory's read-out
    (M3)         w_m   = softmax_m(rho_h * q . kbar_m / sqrt(Dm)),  kbar_m = K_m / (tokens in m)
    (M4)         A_mem = sum_m w_m r_m
    output:      A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_local      per attention head (eq. 6)

(the tags mark the lines of `newllm.models.ops.memory_mix` that compute them).

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

from newllm.models.layers.base import StateField, check_positive, register_layer
from newllm.models.layers.memory import MemoryLayer, MemoryLayerConfig, MemoryPart
from newllm.models.ops.memory_mix import MixtureState, mixture_scan


@dataclass
class MultiMemoryLayerConfig(MemoryLayerConfig):
    num_memories: int = 4  # M independent memories (seed 001 default)
    route_scale_init: float = 1.0  # initial rho: 1 = the plain attention scale q.kbar / sqrt(Dm)

    def __post_init__(self):
        super().__post_init__()
        check_positive(type(self).__name__, num_memories=self.num_memories, route_scale_init=self.route_scale_init)


class MultiMemoryState(NamedTuple):
    """State of a MultiMemoryLayer (batch on dim 0, counters 0-dim)."""

    memory: torch.Tensor  # (B, M, Hm, Dm, Dm) fp32
    norm: torch.Tensor  # (B, M, Hm, Dm) fp32: z_m
    key_sum: torch.Tensor  # (B, M, Hm, Dm) fp32: K_m, sum of raw keys written into m
    segment_k: torch.Tensor  # (B, P, hkv * Dh): keys of the current incomplete segment, P < S
    segment_v: torch.Tensor  # (B, P, hkv * Dh)
    segments: torch.Tensor  # () int64: completed segments written
    skipped: torch.Tensor  # () int64: memory updates skipped for NaN/Inf


def mixture_fields(c: MultiMemoryLayerConfig) -> dict[str, StateField]:
    M, Hm, Dm = c.num_memories, c.memory_heads, c.memory_dim
    return {"memory": StateField((M, Hm, Dm, Dm), torch.float32), "norm": StateField((M, Hm, Dm), torch.float32),
            "key_sum": StateField((M, Hm, Dm), torch.float32)}


def route_log_scale(c: MultiMemoryLayerConfig) -> nn.Parameter:
    """log rho, one per memory head (rho = exp(log rho) > 0: the sharpness of the mix, (M3))."""
    return nn.Parameter(torch.full((c.memory_heads,), math.log(c.route_scale_init)))


class MixtureMemoryPart(MemoryPart):
    """M round-robin memories and the routing scale rho (one per memory head, a gate-like scalar)."""

    def __init__(self, config: MultiMemoryLayerConfig):
        super().__init__()
        self.config = config
        self.route_log_scale = route_log_scale(config)

    @property
    def route_scale(self) -> torch.Tensor:
        return self.route_log_scale.exp()

    def gate_parameters(self) -> list[nn.Parameter]:
        return [self.route_log_scale]

    def state_fields(self) -> dict[str, StateField]:
        return mixture_fields(self.config)

    def scan(self, x, q, k, v, state):
        c = self.config
        mix = MixtureState(state.memory, state.norm, state.key_sum, state.segments, state.skipped)
        a_mem, mix = mixture_scan(q, k, v, mix, segment_length=c.segment_length, route_scale=self.route_scale,
                                  delta_rule=c.use_delta_rule, scale=c.memory_scale, eps=c.memory_eps,
                                  clamp=c.memory_update_clamp, check_finite=c.check_finite, write_partial=False)
        return a_mem, mix._asdict()


@register_layer("multi_memory")
class MultiMemoryLayer(MemoryLayer):
    config_class = MultiMemoryLayerConfig
    state_type = MultiMemoryState
    memory_part = MixtureMemoryPart

    # 41 tokens = 6 full 6-token segments + 5: every one of 3 memories written twice, then a partial
    tiny_options = {"segment_length": 6, "num_memories": 3}
