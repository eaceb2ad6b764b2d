"""InfiniLayer: Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143) in a GPT-NeoX or Llama block.

    x ──┬── norm1 ── q,k,v ──┬── memory read  A_mem  (M_{s-1}, z_{s-1}; eq. 3) ───────┐
        │                    └── local attention A_loc (causal, inside the segment; eq. 2) ┤ gate (eq. 6)
        │                         A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_loc  (per head)
        ├── norm2 ── mlp ────────────────────────────────────────────────────────────────────┤
        └──────────────────────────────────────────────────> y = x + o(A) + mlp(norm2(x))   (neox, parallel)

The block (`block="neox"`, default: LayerNorm, GELU MLP, Pythia's parallel residual, so an Infini
layer takes a PythiaLayer's place; `block="llama"`: RMSNorm, SwiGLU, GQA, so it takes a
LlamaLayer's place) is `blocks.Block`; the mixer (projections, segments, local attention, gate) is
`memory.MemoryMixer`. This file is the memory: one Infini memory per memory head, optionally in
banks.

Memory (equations and guards: `newllm.models.ops.memory`, tagged there with the paper's numbers):
    read   A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})                    eq. 3
    write  M_s = M_{s-1} + sigma(K)^T V                                     eq. 4  (use_delta_rule=False)
           M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))   eq. 5  (default)
           z_s = z_{s-1} + sum_t sigma(K_t)
Banks (`num_memory_banks` N, `segments_per_bank`): once a bank has absorbed its segments, writing
moves to the next (and wraps around); a read pools all banks.

State (`InfiniState`): the memory (fp32, all banks) plus the keys and values of the current,
incomplete segment and the counters. Fixed size: N * Hm * Dm * (Dm + 1) floats + 2 * (S - 1) * d,
whatever the stream length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from newllm.models.layers.base import StateField, check_positive, register_layer
from newllm.models.layers.memory import MemoryLayer, MemoryLayerConfig, MemoryPart
from newllm.models.ops.memory import MemoryState, memory_scan


@dataclass
class InfiniLayerConfig(MemoryLayerConfig):
    num_memory_banks: int = 1
    segments_per_bank: int = 4  # segments a bank absorbs before writing moves to the next bank

    def __post_init__(self):
        super().__post_init__()
        check_positive("InfiniLayer", num_memory_banks=self.num_memory_banks, segments_per_bank=self.segments_per_bank)


class InfiniState(NamedTuple):
    """State of an InfiniLayer (batch on dim 0, counters 0-dim)."""

    memory: torch.Tensor  # (B, N, Hm, Dm, Dm) fp32: M of each bank
    norm: torch.Tensor  # (B, N, Hm, Dm) fp32: z of each bank
    segment_k: torch.Tensor  # (B, P, hkv * Dh): keys of the current incomplete segment, P < S
    segment_v: torch.Tensor  # (B, P, hkv * Dh): its values
    segments: torch.Tensor  # () int64: completed segments written to memory
    skipped: torch.Tensor  # () int64: memory updates skipped for NaN/Inf


class BankedMemoryPart(MemoryPart):
    """Infini's memory: N banks of (Hm, Dm, Dm) matrices and their normalisers."""

    def __init__(self, config: InfiniLayerConfig):
        super().__init__()
        self.config = config

    def state_fields(self) -> dict[str, StateField]:
        c = self.config
        N, Hm, Dm = c.num_memory_banks, c.memory_heads, c.memory_dim
        return {"memory": StateField((N, Hm, Dm, Dm), torch.float32), "norm": StateField((N, Hm, Dm), torch.float32)}

    def scan(self, x, q, k, v, state):
        c = self.config
        mem = MemoryState(state.memory, state.norm, state.segments, state.skipped)
        a_mem, mem = memory_scan(q, k, v, mem, segment_length=c.segment_length,
                                 segments_per_bank=c.segments_per_bank, delta_rule=c.use_delta_rule,
                                 scale=c.memory_scale, eps=c.memory_eps, clamp=c.memory_update_clamp,
                                 check_finite=c.check_finite, write_partial=False)
        return a_mem, dict(memory=mem.memory, norm=mem.norm, segments=mem.segments, skipped=mem.skipped)


@register_layer("infini")
class InfiniLayer(MemoryLayer):
    config_class = InfiniLayerConfig
    state_type = InfiniState
    memory_part = BankedMemoryPart

    # 8-token segments and 2 banks of 2 segments: a 41-token test spans 5 segments + a partial one
    # and wraps around the banks
    tiny_options = {"segment_length": 8, "num_memory_banks": 2, "segments_per_bank": 2}
