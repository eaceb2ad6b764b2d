"""HierarchicalLayer: a coarse memory of the whole stream plus fine memories, read coarse-to-fine.

The block is InfiniLayer's (projections, local attention, gate beta, MLP, parallel residual; see
`infini.py`). The memory has two levels::

    coarse: one Infini memory that absorbs EVERY segment (memory_scan, 1 bank): the summary of all
            that the fine memories hold, between them
    fine:   M memories written round-robin (segment n -> memory n % M), read as the
            attention-weighted mix of MultiMemoryLayer (ops/memory_mix.py)

    A_coarse = phi(q) Mc / (phi(q) zc + eps)
    A_fine   = sum_m softmax_m(rho * q . kbar_m / sqrt(Dm)) * phi(q) M_m / (phi(q) z_m + eps)
    e        = sigmoid(w_e . ln1(x) + b_e)              expansion gate, per token and memory head
    A_mem    = A_coarse + e * (A_fine - A_coarse)       coarse first, then "expand" into the fine level
    A        = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_local

Why these choices:
* The coarse memory is written directly (not rebuilt from the fine ones) so that it is a complete
  Infini memory of the stream on its own: under the delta rule a sum of fine memories is not the
  memory of the whole stream, and a direct write costs one more (Dm x Dm) matmul per segment.
* The expansion gate is CONTINUOUS and computed from the token itself (ln1(x), the input of q/k/v),
  so the model learns which tokens need the detail of the fine level; every token contributes a
  gradient to both levels. A discrete decision in training makes the loss depend on which tokens
  were skipped (seed 001's training-evaluation-consistency lesson), so training and evaluation
  always use e as it is. The gate starts at sigmoid(`expansion_gate_init`) for every token (weights
  zero), an even coarse/fine mix by default.
* A threshold exists only for generation, as an explicit switch: `expansion_threshold(model, tau)`
  (a context manager) makes e = 1[e >= tau] while decoding; it refuses a model in training mode.

State (`HierarchicalState`): the fine memories (fp32) with z and key sums, the coarse memory and
its z, the incomplete segment's keys/values, counters. Fixed size:
(M + 1) * Hm * Dm * (Dm + 1) + M * Hm * Dm floats + 2 * (S - 1) * d.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.base import register_layer, resolve_config
from newllm.models.layers.multi_memory import MixtureLayerBase, MultiMemoryLayerConfig
from newllm.models.ops.memory import MemoryState, memory_scan


@dataclass
class HierarchicalLayerConfig(MultiMemoryLayerConfig):
    expansion_gate_init: float = 0.0  # b_e at init: sigmoid(0) = 0.5 of the fine read-out mixed in


class HierarchicalState(NamedTuple):
    """State of a HierarchicalLayer (batch on dim 0, counters 0-dim)."""

    memory: torch.Tensor  # (B, M, Hm, Dm, Dm) fp32: fine memories
    norm: torch.Tensor  # (B, M, Hm, Dm) fp32
    key_sum: torch.Tensor  # (B, M, Hm, Dm) fp32
    coarse_memory: torch.Tensor  # (B, Hm, Dm, Dm) fp32
    coarse_norm: torch.Tensor  # (B, Hm, Dm) fp32
    segment_k: torch.Tensor  # (B, P, d), P < S
    segment_v: torch.Tensor  # (B, P, d)
    segments: torch.Tensor  # () int64: completed segments (written to the coarse and one fine memory)
    skipped: torch.Tensor  # () int64: memory updates skipped for NaN/Inf (fine and coarse together)


@register_layer("hierarchical")
class HierarchicalLayer(MixtureLayerBase):
    config_class = HierarchicalLayerConfig
    has_compressive_memory = True

    def __init__(self, *args, config: HierarchicalLayerConfig | None = None, **kwargs):
        config = resolve_config(HierarchicalLayerConfig, config, args, kwargs,
                                ("hidden_size", "num_attention_heads", "intermediate_size"))
        super().__init__(config)
        self.expansion = nn.Linear(config.hidden_size, config.memory_heads)  # w_e, b_e
        nn.init.zeros_(self.expansion.weight)
        nn.init.constant_(self.expansion.bias, config.expansion_gate_init)
        #: generation-only hard threshold on e (None: the continuous gate); see expansion_threshold()
        self.threshold: float | None = None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"gates": [self.beta, self.route_log_scale, self.expansion.weight, self.expansion.bias]}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        Hm, Dm = c.memory_heads, c.memory_dim
        return {**super().state_shapes(), "coarse_memory": (Hm, Dm, Dm), "coarse_norm": (Hm, Dm)}

    def init_state(self, batch_size: int, device=None, dtype=None) -> HierarchicalState:
        c = self.config
        fine = self.config.num_memories, c.memory_heads, c.memory_dim
        z = lambda *s: torch.zeros(batch_size, *s, device=device)  # noqa: E731
        empty = torch.zeros(batch_size, 0, c.hidden_size, device=device, dtype=dtype)
        long0 = torch.zeros((), dtype=torch.long, device=device)
        return HierarchicalState(z(*fine, c.memory_dim), z(*fine), z(*fine), z(*fine[1:], c.memory_dim),
                                 z(*fine[1:]), empty, empty, long0, long0.clone())

    def expansion_gate(self, x: torch.Tensor) -> torch.Tensor:
        """e (B, Hm, T, 1) from the layer's normed input x (B, T, d)."""
        e = torch.sigmoid(self.expansion(x).float()).transpose(1, 2).unsqueeze(-1)
        if self.threshold is not None:
            if self.training:
                raise NewLLMError("HierarchicalLayer: the expansion threshold is for generation only; the model "
                                  "is in training mode")
            e = (e >= self.threshold).float()
        return e

    def memory_step(self, x, q, k, v, state: HierarchicalState):
        c = self.config
        a_fine, mix = self.scan_fine(q, k, v, state)
        coarse = MemoryState(state.coarse_memory.unsqueeze(1), state.coarse_norm.unsqueeze(1), state.segments,
                             torch.zeros_like(state.skipped))
        a_coarse, coarse = memory_scan(q, k, v, coarse, segment_length=c.segment_length, delta_rule=c.use_delta_rule,
                                       scale=c.memory_scale, eps=c.memory_eps, clamp=c.memory_update_clamp,
                                       check_finite=c.check_finite, write_partial=False)
        e = self.expansion_gate(x).to(a_fine.dtype)
        a_mem = torch.lerp(a_coarse, a_fine, e)  # coarse + e * (fine - coarse)
        return a_mem, dict(memory=mix.memory, norm=mix.norm, key_sum=mix.key_sum,
                           coarse_memory=coarse.memory.squeeze(1), coarse_norm=coarse.norm.squeeze(1),
                           segments=mix.segments, skipped=mix.skipped + coarse.skipped)


@contextlib.contextmanager
def expansion_threshold(model: nn.Module, threshold: float):
    """Inside the block, every HierarchicalLayer of `model` uses e = 1[e >= threshold] (generation only).

    >>> with expansion_threshold(model.eval(), 0.5):
    ...     out = model.generate(ids, max_new_tokens=20)
    """
    if model.training:
        raise NewLLMError("expansion_threshold: the model is in training mode; the threshold is for generation "
                          "only (training and evaluation use the continuous gate)")
    if not 0.0 <= threshold <= 1.0:
        raise NewLLMError(f"expansion_threshold: threshold must be in [0, 1], got {threshold}")
    layers = [m for m in model.modules() if isinstance(m, HierarchicalLayer)]
    if not layers:
        raise NewLLMError("expansion_threshold: the model has no HierarchicalLayer")
    for layer in layers:
        layer.threshold = threshold
    try:
        yield model
    finally:
        for layer in layers:
            layer.threshold = None
