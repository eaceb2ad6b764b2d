"""HierarchicalLayer: a coarse memory of the whole stream plus fine memories, read coarse-to-fine.

The block and mixer are InfiniLayer's (`blocks.Block`, `memory.MemoryMixer`: projections, local
attention, gate beta, MLP, residual; `block="neox"` or `"llama"`). This file is the memory, two
levels read in one scan (`ops.memory_mix.coarse_to_fine_scan`)::

    coarse: one Infini memory that absorbs EVERY segment (eq. 3 read, eq. 4/5 write): the summary
            of all that the fine memories hold, between them
    fine:   M memories written round-robin (segment n -> memory n % M), read as the
            attention-weighted mix of MultiMemoryLayer ((M1)-(M4) in ops/memory_mix.py)

    (H1) A_coarse = phi(q) Mc / (phi(q) zc + eps)
    (H2) A_fine   = sum_m softmax_m(rho * q . kbar_m / sqrt(Dm)) * phi(q) M_m / (phi(q) z_m + eps)
    (H3) e        = sigmoid(w_e . norm1(x) + b_e)          expansion gate, per token and memory head
    (H4) A_mem    = A_coarse + e * (A_fine - A_coarse)     coarse first, then "expand" into the fine level
         A        = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_local                 (eq. 6)

Why these choices:
* The coarse memory is written directly (not rebuilt from the fine ones) so that it is a complete
  Infini memory of the stream on its own: under the delta rule a sum of fine memories is not the
  memory of the whole stream, and a direct write costs one more (Dm x Dm) matmul per segment.
* The expansion gate is CONTINUOUS and computed from the token itself (norm1(x), the input of
  q/k/v), so the model learns which tokens need the detail of the fine level; every token
  contributes a gradient to both levels. A discrete decision in training makes the loss depend on
  which tokens were skipped (seed 001's training-evaluation-consistency lesson), so training and
  evaluation always use e as it is. The gate starts at sigmoid(`expansion_gate_init`) for every
  token (weights zero), an even coarse/fine mix by default.
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
from newllm.models.layers.base import StateField, register_layer
from newllm.models.layers.memory import MemoryLayer, MemoryPart
from newllm.models.layers.multi_memory import MultiMemoryLayerConfig, mixture_fields, route_log_scale
from newllm.models.ops.memory import MemoryState
from newllm.models.ops.memory_mix import MixtureState, coarse_to_fine_scan


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
    segment_k: torch.Tensor  # (B, P, hkv * Dh), P < S
    segment_v: torch.Tensor  # (B, P, hkv * Dh)
    segments: torch.Tensor  # () int64: completed segments (written to the coarse and one fine memory)
    skipped: torch.Tensor  # () int64: memory updates skipped for NaN/Inf (fine and coarse together)


class ExpansionGate(nn.Linear):
    """(H3) e = sigmoid(w_e . x + b_e): (B, T, d) -> (B, T, Hm) in fp32, the per-token gate the
    experiment records (its output, through a forward hook)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(x).float())


class CoarseToFinePart(MemoryPart):
    """Fine memories (MultiMemoryLayer's fields and rho, under the same names) + a coarse memory +
    the expansion gate."""

    def __init__(self, config: HierarchicalLayerConfig):
        super().__init__()
        self.config = config
        self.route_log_scale = route_log_scale(config)
        # built without drawing random numbers; init_parameters draws nn.Linear's own initialisation
        # after the block's, where this layer drew it before layers became blocks and mixers, so a
        # seed gives the same weights (the reference test checks it), and then sets w_e = 0, b_e = init
        self.expansion = nn.utils.skip_init(ExpansionGate, config.hidden_size, config.memory_heads)
        #: generation-only hard threshold on e (None: the continuous gate); see expansion_threshold()
        self.threshold: float | None = None

    def init_parameters(self) -> None:
        self.expansion.reset_parameters()
        nn.init.zeros_(self.expansion.weight)
        nn.init.constant_(self.expansion.bias, self.config.expansion_gate_init)

    def gate_parameters(self) -> list[nn.Parameter]:
        return [self.route_log_scale, self.expansion.weight, self.expansion.bias]

    def token_gates(self) -> dict[str, nn.Module]:
        return {"expansion": self.expansion}

    def state_fields(self) -> dict[str, StateField]:
        c = self.config
        Hm, Dm = c.memory_heads, c.memory_dim
        return {**mixture_fields(c), "coarse_memory": StateField((Hm, Dm, Dm), torch.float32),
                "coarse_norm": StateField((Hm, Dm), torch.float32)}

    def expansion_gate(self, x: torch.Tensor) -> torch.Tensor:
        """e (B, Hm, T, 1) from the layer's normed input x (B, T, d)."""
        e = self.expansion(x).transpose(1, 2).unsqueeze(-1)
        if self.threshold is not None:
            if self.training:
                raise NewLLMError("HierarchicalLayer: the expansion threshold is for generation only; the model "
                                  "is in training mode")
            e = (e >= self.threshold).float()
        return e

    def scan(self, x, q, k, v, state: HierarchicalState):
        c = self.config
        fine = MixtureState(state.memory, state.norm, state.key_sum, state.segments, state.skipped)
        coarse = MemoryState(state.coarse_memory.unsqueeze(1), state.coarse_norm.unsqueeze(1), state.segments,
                             torch.zeros_like(state.skipped))
        a_coarse, a_fine, fine, coarse = coarse_to_fine_scan(  # (H1), (H2)
            q, k, v, fine, coarse, segment_length=c.segment_length, route_scale=self.route_log_scale.exp(),
            delta_rule=c.use_delta_rule, scale=c.memory_scale, eps=c.memory_eps, clamp=c.memory_update_clamp,
            check_finite=c.check_finite, write_partial=False)
        e = self.expansion_gate(x).to(a_fine.dtype)  # (H3)
        a_mem = torch.lerp(a_coarse, a_fine, e)  # (H4) coarse + e * (fine - coarse)
        return a_mem, dict(memory=fine.memory, norm=fine.norm, key_sum=fine.key_sum,
                           coarse_memory=coarse.memory.squeeze(1), coarse_norm=coarse.norm.squeeze(1),
                           segments=fine.segments, skipped=fine.skipped)


@register_layer("hierarchical")
class HierarchicalLayer(MemoryLayer):
    config_class = HierarchicalLayerConfig
    state_type = HierarchicalState
    memory_part = CoarseToFinePart

    tiny_options = {"segment_length": 6, "num_memories": 3, "use_delta_rule": False}


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
    parts = [m for m in model.modules() if isinstance(m, CoarseToFinePart)]
    if not parts:
        raise NewLLMError("expansion_threshold: the model has no HierarchicalLayer")
    for part in parts:
        part.threshold = threshold
    try:
        yield model
    finally:
        for part in parts:
            part.threshold = None
