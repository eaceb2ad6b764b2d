"""InfiniLayer: Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143) in a Pythia-style block.

    x ──┬── ln1 ── q,k,v ──┬── memory read  A_mem  (M_{s-1}, z_{s-1}; one Dm-wide memory head) ──┐
        │                  └── local attention A_loc (causal, inside the segment, no positions) ──┤ gate
        │                       A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_loc  (per head)
        ├── ln2 ── mlp ────────────────────────────────────────────────────────────────────────────┤
        └──────────────────────────────────────────────────────────────────────> y = x + dense(A) + mlp(ln2(x))

The residual is Pythia's parallel one (with `use_parallel_residual=False` the sequential one:
h = x + dense(A), y = h + mlp(ln2(h))), so an Infini layer takes a PythiaLayer's place in a stack.

Segments. The token stream is cut into segments of S = `segment_length` tokens, counted from the
first token the layer ever saw (not from the start of each call). Every token of segment s reads
the memory as it was after segment s-1 (eq. 3) and attends causally to the earlier tokens of its own
segment; when segment s completes, it is written into the memory (eq. 4 linear, or eq. 5 delta
rule, `use_delta_rule`) and z accumulates sum_t phi(k_t). The equations and the numerical guards are
in `newllm.models.ops.memory`.

State (`InfiniState`): the memory (fp32, all banks) plus the keys and values of the current,
incomplete segment (at most S - 1 tokens), which local attention still needs and which will be
written into the memory once the segment completes. That is what makes one call equal to the same
tokens fed in any pieces, 1 token at a time included. Its size is fixed: N * H * Dm * (Dm + 1)
floats + 2 * (S - 1) * d, whatever the stream length.

Heads. q, k, v come from one fused projection (d -> 3d, split [q | k | v]). Local attention uses
`num_attention_heads` heads of Dh = d / h, the memory uses d / `memory_head_dim` heads of Dm
(default Dm = d, one memory head: the seeds found 64-dim memory heads store almost nothing, a
Dm-dim linear memory holds about Dm associations). The memory read-out (B, T, d) is split into the
h attention heads for the gate, so beta is per attention head.

Local attention: "softmax" (the paper, scale 1/sqrt(Dh)) or "linear" (causal linear attention
with phi(x / sqrt(Dh)) features, restarted at each segment). Neither uses positional encodings.

`use_memory=False` switches the memory off (no read: A_mem = 0 with the gate unchanged, no write):
the ablation that shows what the memory contributes. The gate parameter beta gets its own
optimizer group (`param_groups()["gates"]`): own learning rate, no weight decay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.base import check_positive, register_layer, resolve_config
from newllm.models.layers.pythia import ACTIVATIONS, NeoXBlock
from newllm.models.ops.attention import causal_attention
from newllm.models.ops.linear_attention import causal_linear_attention
from newllm.models.ops.memory import MemoryState, init_memory, memory_scan

LOCAL_ATTENTION = ("softmax", "linear")


@dataclass
class InfiniLayerConfig:
    hidden_size: int = 512  # Pythia-70m sizes
    num_attention_heads: int = 8  # local-attention heads; the gate beta has one value per head
    intermediate_size: int = 2048
    segment_length: int = 256  # S: tokens per segment (the paper's N); memory is written per segment
    memory_head_dim: int | None = None  # Dm; None = hidden_size (one memory head, see module doc)
    use_delta_rule: bool = True  # eq. 5 (write only what the memory does not yet predict) vs eq. 4
    num_memory_banks: int = 1
    segments_per_bank: int = 4  # segments a bank absorbs before writing moves to the next bank
    local_attention: str = "softmax"  # "softmax" (paper) or "linear"
    use_memory: bool = True  # False: no memory read or write (ablation)
    memory_scale: float | None = None  # phi(x * scale) for memory keys/queries; None = 1/sqrt(Dm)
    memory_eps: float = 1e-6  # guard of the read denominator phi(q) z
    memory_update_clamp: float | None = None  # clamp each segment's dM elementwise (None: off)
    check_finite: bool = True  # skip (and count) memory updates with NaN/Inf
    linear_chunk_size: int = 64  # chunk of the chunkwise linear local attention
    gate_init: float = 0.0  # initial beta: sigmoid(0) = 0.5, an even mix of memory and local attention
    use_parallel_residual: bool = True
    layer_norm_eps: float = 1e-5
    attention_bias: bool = True
    hidden_act: str = "gelu"
    initializer_range: float = 0.02

    def __post_init__(self):
        check_positive("InfiniLayer", hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                       intermediate_size=self.intermediate_size, segment_length=self.segment_length,
                       num_memory_banks=self.num_memory_banks, segments_per_bank=self.segments_per_bank,
                       memory_eps=self.memory_eps, linear_chunk_size=self.linear_chunk_size,
                       layer_norm_eps=self.layer_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            raise NewLLMError(f"InfiniLayer: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.memory_head_dim is not None:
            check_positive("InfiniLayer", memory_head_dim=self.memory_head_dim)
            if self.hidden_size % self.memory_head_dim:
                raise NewLLMError(f"InfiniLayer: hidden_size {self.hidden_size} is not divisible by "
                                  f"memory_head_dim {self.memory_head_dim}")
        if self.local_attention not in LOCAL_ATTENTION:
            raise NewLLMError(f"InfiniLayer: local_attention must be one of {LOCAL_ATTENTION}, "
                              f"got {self.local_attention!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise NewLLMError(f"InfiniLayer: unknown hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        for name in ("memory_scale", "memory_update_clamp"):
            if getattr(self, name) is not None:
                check_positive("InfiniLayer", **{name: getattr(self, name)})

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def memory_dim(self) -> int:
        return self.memory_head_dim or self.hidden_size

    @property
    def memory_heads(self) -> int:
        return self.hidden_size // self.memory_dim


class InfiniState(NamedTuple):
    """State of an InfiniLayer (batch on dim 0, counters 0-dim)."""

    memory: torch.Tensor  # (B, N, Hm, Dm, Dm) fp32: M of each bank
    norm: torch.Tensor  # (B, N, Hm, Dm) fp32: z of each bank
    segment_k: torch.Tensor  # (B, P, d): keys of the current incomplete segment, P < S
    segment_v: torch.Tensor  # (B, P, d): its values
    segments: torch.Tensor  # () int64: completed segments written to memory
    skipped: torch.Tensor  # () int64: memory updates skipped for NaN/Inf


@register_layer("infini")
class InfiniLayer(NeoXBlock):
    config_class = InfiniLayerConfig
    has_compressive_memory = True

    def __init__(self, *args, config: InfiniLayerConfig | None = None, **kwargs):
        config = resolve_config(InfiniLayerConfig, config, args, kwargs,
                                ("hidden_size", "num_attention_heads", "intermediate_size"))
        super().__init__(config)  # the NeoX block: norms, projections, MLP (see NeoXBlock)
        self.beta = nn.Parameter(torch.full((config.num_attention_heads,), float(config.gate_init)))

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, device=None, dtype=None) -> InfiniState:
        c = self.config
        mem = init_memory(batch_size, c.memory_heads, c.memory_dim, c.memory_dim, banks=c.num_memory_banks,
                          device=device)
        empty = torch.zeros(batch_size, 0, c.hidden_size, device=device, dtype=dtype)
        return InfiniState(mem.memory, mem.norm, empty, empty, mem.segments, mem.skipped)

    def check_state(self, state: InfiniState, batch_size: int) -> None:
        c = self.config
        want = (c.num_memory_banks, c.memory_heads, c.memory_dim, c.memory_dim)
        if tuple(state.memory.shape[1:]) != want or tuple(state.norm.shape[1:]) != want[:-1]:
            raise NewLLMError(f"InfiniLayer: state memory {tuple(state.memory.shape)} / norm "
                              f"{tuple(state.norm.shape)} does not fit (batch, {', '.join(map(str, want))})")
        p = state.segment_k.shape[1]
        if state.segment_k.shape[-1] != c.hidden_size or state.segment_v.shape != state.segment_k.shape \
                or p >= c.segment_length:
            raise NewLLMError(f"InfiniLayer: state segment_k {tuple(state.segment_k.shape)} / segment_v "
                              f"{tuple(state.segment_v.shape)} must be (batch, < {c.segment_length}, {c.hidden_size})")
        if state.memory.shape[0] != batch_size:
            raise NewLLMError(f"InfiniLayer: state has batch size {state.memory.shape[0]}, input has {batch_size}")

    def tokens_absorbed(self, state: InfiniState) -> int:
        return int(state.segments) * self.config.segment_length + state.segment_k.shape[1]

    def gate_values(self) -> torch.Tensor:
        """sigmoid(beta) per head: the weight of the memory read-out (what the trainer logs)."""
        return torch.sigmoid(self.beta.detach().float())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"gates": [self.beta]}

    # ------------------------------------------------------------------ forward
    def local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: int) -> torch.Tensor:
        """Causal attention inside each segment, token-major layout. q: (B, T, h, Dh) are the last T of
        the L = p + T positions of k, v: (B, L, h, Dh), which start on a segment boundary.
        Returns (B, T, h, Dh)."""
        B, L, h, Dh = k.shape
        S, T = self.config.segment_length, q.shape[1]
        softmax = self.config.local_attention == "softmax"
        if softmax and L <= S:  # all queries in one segment (streaming, decoding): no padding needed
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p, 0, Dh**-0.5)
            return out.transpose(1, 2)
        n = -(-L // S)
        pad = n * S - L
        if p or pad:
            # front-pad q to align it with k; end-pad everything to whole segments. Padded keys sit
            # after every real query (invisible under the causal mask); padded query rows are dropped.
            q, k, v = F.pad(q, (0, 0, 0, 0, p, pad)), F.pad(k, (0, 0, 0, 0, 0, pad)), F.pad(v, (0, 0, 0, 0, 0, pad))
        # segments become batch entries: (B, n*S, h, Dh) -> (B*n, h, S, Dh), a view when unpadded
        qs, ks, vs = (t.view(B, n, S, h, Dh).transpose(2, 3).reshape(B * n, h, S, Dh) for t in (q, k, v))
        if softmax:
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=Dh**-0.5)
        else:
            out, _ = causal_linear_attention(qs, ks, vs, scale=Dh**-0.5, eps=self.config.memory_eps,
                                             chunk_size=min(self.config.linear_chunk_size, S))
        return out.view(B, n, h, S, Dh).transpose(2, 3).reshape(B, n * S, h, Dh)[:, p:p + T]

    def memory_step(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state):
        """The compressive memory: every query reads M_{s-1}; completed segments are written.

        q: (B, Hm, T, Dm), the last T of the L positions of k, v: (B, Hm, L, Dm), which start on a
        segment boundary. Returns (A_mem (B, Hm, T, Dm), the state fields it changed). Subclasses
        with another memory (multi-memory, hierarchical) override only this method.
        """
        c = self.config
        mem = MemoryState(state.memory, state.norm, state.segments, state.skipped)
        a_mem, mem = memory_scan(q, k, v, mem, segment_length=c.segment_length,
                                 segments_per_bank=c.segments_per_bank, delta_rule=c.use_delta_rule,
                                 scale=c.memory_scale, eps=c.memory_eps, clamp=c.memory_update_clamp,
                                 check_finite=c.check_finite, write_partial=False)
        return a_mem, dict(memory=mem.memory, norm=mem.norm, segments=mem.segments, skipped=mem.skipped)

    def attention(self, x: torch.Tensor, state):
        c = self.config
        B, T, d = x.shape
        h, Dh, Hm, Dm = c.num_attention_heads, c.head_size, c.memory_heads, c.memory_dim
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        self.check_state(state, B)
        q, k, v = self.query_key_value(x).split(d, dim=-1)  # (B, T, d) each
        p = state.segment_k.shape[1]
        if p:  # keys/values of the current segment's earlier tokens come first: (B, L, d), L = p + T
            k_all = torch.cat((state.segment_k.to(k.dtype), k), dim=1)
            v_all = torch.cat((state.segment_v.to(v.dtype), v), dim=1)
        else:
            k_all, v_all = k, v
        L = p + T
        heads = lambda t, n, D: t.view(B, t.shape[1], n, D)  # noqa: E731  (B, *, n, D), token-major
        a_loc = self.local_attention(heads(q, h, Dh), heads(k_all, h, Dh), heads(v_all, h, Dh), p)
        g = torch.sigmoid(self.beta).to(a_loc.dtype).view(1, 1, h, 1)
        if c.use_memory:
            a_mem, fields = self.memory_step(x, *(heads(t, Hm, Dm).transpose(1, 2) for t in (q, k_all, v_all)),
                                             state)
            a_mem = a_mem.transpose(1, 2).reshape(B, T, h, Dh)  # memory heads -> attention heads
            a = torch.lerp(a_loc, a_mem, g)  # the paper's gate: g * A_mem + (1 - g) * A_loc
            state = state._replace(**fields)
        else:
            a = (1 - g) * a_loc  # memory switched off: A_mem = 0, gate unchanged
        done = L - L % c.segment_length  # tokens of completed segments; the rest stays in the state
        new_state = state._replace(segment_k=k_all[:, done:].clone(), segment_v=v_all[:, done:].clone())
        return self.dense(a.reshape(B, T, d)), new_state
