"""The compressive-memory token mixer (Infini-attention, arXiv 2404.07143) with a pluggable memory.

    q, k, v = projections(x)                                  x: the block's normed input (B, T, d)
    A_loc   = local attention inside the segment              causal softmax (paper eq. 2) or linear
    A_mem   = memory read of M_{s-1}                          eq. 3 (or the part's own read)
    A       = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_loc     eq. 6, beta per attention head
    out     = o(A);  completed segments are written into the memory    eq. 4 / eq. 5 (or the part's)

The memory itself is a *part* (`MemoryPart`): one Infini memory with optional banks (`infini.py`),
M memories read as a mixture (`multi_memory.py`), or a coarse memory with fine ones under it
(`hierarchical.py`). The mixer does what they share: the projections, the segment carry, local
attention, the gate; each part's `scan` reads and writes its memory through the one segment
helper of `ops/memory.py` (`scan_segments`).

Segments. The token stream is cut into segments of S = `segment_length` tokens, counted from the
first token the layer ever saw (not from the start of each call). Every token of segment s reads
the memory as it was after segment s-1 and attends causally to the earlier tokens of its own
segment; when segment s completes it is written into the memory. The state carries the keys and
values of the current, incomplete segment (at most S - 1 tokens): that is what makes one call equal
to the same tokens fed in any pieces, 1 token at a time included. No positional encoding.

Heads. Local attention uses `num_attention_heads` heads of Dh = d / h (with the llama block,
`num_key_value_heads` key/value heads, each shared by h / hkv query heads). The memory uses
(h Dh) / `memory_head_dim` heads of Dm (default one head of Dm = h Dh: the seeds found that 64-dim
memory heads store almost nothing; a Dm-dim linear memory holds about Dm associations), with the
key/value heads repeated for GQA. The memory read-out (B, T, h Dh) is split into the h attention
heads for the gate, so beta is per attention head.

`use_memory=False` (or `layer.memory_enabled = False`, the ablation switch) reads A_mem = 0 with
the gate unchanged and writes nothing. beta and the parts' routing/expansion gates form the
optimizer group "gates": own learning rate, no weight decay (Hugging Face's Infini-attention study
found gates stuck at 0.5 under the shared lr).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.base import StateField, check_positive, check_state_fields, resolve_config
from newllm.models.layers.blocks import ACTIVATIONS, STYLES, Block, Tap, TokenMixer
from newllm.models.ops.attention import causal_attention
from newllm.models.ops.linear_attention import causal_linear_attention

LOCAL_ATTENTION = ("softmax", "linear")
#: the block fields that default by style: (neox, llama)
STYLE_DEFAULTS = {"attention_bias": (True, False), "mlp_bias": (True, False), "hidden_act": ("gelu", "silu")}


@dataclass
class MemoryLayerConfig:
    """Fields every memory layer shares: the block's, the mixer's and the memory's numerics."""

    hidden_size: int = 512  # Pythia-70m sizes
    num_attention_heads: int = 8  # local-attention heads; the gate beta has one value per head
    intermediate_size: int = 2048
    block: str = "neox"  # "neox" (LayerNorm, GELU MLP, parallel residual) or "llama" (RMSNorm, SwiGLU)
    num_key_value_heads: int | None = None  # llama block: GQA key/value heads; None = num_attention_heads
    segment_length: int = 256  # S: tokens per segment (the paper's N); memory is written per segment
    memory_head_dim: int | None = None  # Dm; None = h * Dh (one memory head, see module doc)
    use_delta_rule: bool = True  # eq. 5 (write only what the memory does not yet predict) vs eq. 4
    local_attention: str = "softmax"  # "softmax" (paper) or "linear"
    use_memory: bool = True  # False: no memory read or write (ablation)
    memory_scale: float | None = None  # phi(x * scale) for memory keys/queries; None = 1/sqrt(Dm)
    memory_eps: float = 1e-6  # guard of the read denominator phi(q) z
    memory_update_clamp: float | None = None  # clamp each segment's dM elementwise (None: off)
    check_finite: bool = True  # skip (and count) memory updates with NaN/Inf
    linear_chunk_size: int = 64  # chunk of the chunkwise linear local attention
    gate_init: float = 0.0  # initial beta: sigmoid(0) = 0.5, an even mix of memory and local attention
    use_parallel_residual: bool = True  # neox block only (the llama block is sequential)
    layer_norm_eps: float = 1e-5  # neox block
    rms_norm_eps: float = 1e-5  # llama block
    attention_bias: bool | None = None  # None: the block's default (neox True, llama False)
    mlp_bias: bool | None = None  # None: neox True, llama False
    hidden_act: str | None = None  # None: neox "gelu", llama "silu" (SwiGLU)
    initializer_range: float = 0.02

    def __post_init__(self):
        name = type(self).__name__.removesuffix("Config")
        if self.block not in STYLES:
            raise NewLLMError(f"{name}: block must be one of {STYLES}, got {self.block!r}")
        for key, defaults in STYLE_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, defaults[STYLES.index(self.block)])
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_positive(name, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                       num_key_value_heads=self.num_key_value_heads, intermediate_size=self.intermediate_size,
                       segment_length=self.segment_length, memory_eps=self.memory_eps,
                       linear_chunk_size=self.linear_chunk_size, layer_norm_eps=self.layer_norm_eps,
                       rms_norm_eps=self.rms_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            raise NewLLMError(f"{name}: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise NewLLMError(f"{name}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.block == "neox" and self.num_key_value_heads != self.num_attention_heads:
            raise NewLLMError(f"{name}: grouped-query attention (num_key_value_heads {self.num_key_value_heads}) "
                              "needs block='llama'; the neox block has one fused QKV projection")
        if self.memory_head_dim is not None:
            check_positive(name, memory_head_dim=self.memory_head_dim)
            if self.hidden_size % self.memory_head_dim:
                raise NewLLMError(f"{name}: hidden_size {self.hidden_size} is not divisible by "
                                  f"memory_head_dim {self.memory_head_dim}")
        if self.local_attention not in LOCAL_ATTENTION:
            raise NewLLMError(f"{name}: local_attention must be one of {LOCAL_ATTENTION}, "
                              f"got {self.local_attention!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise NewLLMError(f"{name}: unknown hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        for key in ("memory_scale", "memory_update_clamp"):
            if getattr(self, key) is not None:
                check_positive(name, **{key: getattr(self, key)})

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def memory_dim(self) -> int:
        return self.memory_head_dim or self.hidden_size

    @property
    def memory_heads(self) -> int:
        return self.hidden_size // self.memory_dim


class MemoryPart(nn.Module, metaclass=abc.ABCMeta):
    """The memory of a MemoryMixer: what it stores (its state fields), how a scan reads and writes
    it, and the gates it adds. Subclasses: BankedMemoryPart, MixtureMemoryPart, CoarseToFinePart;
    a part that lacks `state_fields` or `scan` cannot be built (abstract methods)."""

    @abc.abstractmethod
    def state_fields(self) -> dict[str, StateField]:
        """Field name -> StateField of the part's own state tensors (before TAIL_FIELDS)."""

    @abc.abstractmethod
    def scan(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state):
        """A_mem (B, Hm, T, Dm) for the T queries q (the last T of the L positions of k, v: (B, Hm, L, Dm),
        which start on a segment boundary), and the state fields it changed (a dict). x: the
        block's normed input (B, T, d), for parts with a per-token gate."""

    def gate_parameters(self) -> list[nn.Parameter]:
        return []

    def gates(self) -> dict[str, torch.Tensor]:
        return {}

    def token_gates(self) -> dict[str, nn.Module]:
        return {}

    def init_parameters(self) -> None:
        """Called by the block after its own initialisation."""


#: the fields every memory state ends with, after the part's own
TAIL_FIELDS = ("segment_k", "segment_v", "segments", "skipped")


class MemoryMixer(TokenMixer):
    """Infini-attention's mixer around a MemoryPart (module docstring)."""

    has_compressive_memory = True

    def __init__(self, config: MemoryLayerConfig, memory: MemoryPart, state_type: type):
        super().__init__()
        c = config
        self.config, self.state_type = c, state_type
        self.build_projections(c.block, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_size,
                               c.attention_bias)
        self.beta = nn.Parameter(torch.full((c.num_attention_heads,), float(c.gate_init)))
        self.memory = memory
        # the local part, the memory read-out and the gate, for newllm.diagnostics (identity)
        self.tap_local, self.tap_memory_read, self.tap_gate = Tap(), Tap(), Tap()
        self.memory_enabled = c.use_memory  # the ablation switch (BaseLayer.memory_enabled)
        if tuple(state_type._fields) != (*memory.state_fields(), *TAIL_FIELDS):
            raise NewLLMError(f"{state_type.__name__} must have the fields of its memory followed by {TAIL_FIELDS}")

    # ------------------------------------------------------------------ capabilities
    @property
    def memory_segment_length(self) -> int:
        return self.config.segment_length

    @property
    def attention_span(self) -> int:
        """S - 1: local attention stays inside the segment; anything older reaches the output only
        through the memory."""
        return self.config.segment_length - 1

    def state_spec(self) -> dict[str, StateField]:
        kv = StateField((None, self.kv_heads * self.head_dim))  # the incomplete segment's keys/values, P < S
        counter = StateField((), torch.long, batched=False)
        return {**self.memory.state_fields(), "segment_k": kv, "segment_v": kv, "segments": counter,
                "skipped": counter}

    def check_state(self, state, batch_size: int | None = None) -> None:
        name = self.state_type.__name__.removesuffix("State") + "Layer"
        check_state_fields(name, self.state_spec(), state, batch_size)
        k, v, S = state.segment_k, state.segment_v, self.config.segment_length
        if k.shape != v.shape or k.shape[1] >= S:
            raise NewLLMError(f"{name}: state segment_k {tuple(k.shape)} / segment_v {tuple(v.shape)} must be "
                              f"(batch, < {S}, {k.shape[-1]}), equal: the incomplete segment is shorter than S")

    def tokens_absorbed(self, state) -> int:
        return int(state.segments) * self.config.segment_length + state.segment_k.shape[1]

    def gates(self) -> dict[str, torch.Tensor]:
        """{"memory": sigmoid(beta) per head, the weight of the memory read-out} and the part's."""
        return {"memory": torch.sigmoid(self.beta.detach().float()), **self.memory.gates()}

    def token_gates(self) -> dict[str, nn.Module]:
        return self.memory.token_gates()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"gates": [self.beta, *self.memory.gate_parameters()]}

    def init_parameters(self) -> None:
        self.memory.init_parameters()

    # ------------------------------------------------------------------ forward
    def local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: int) -> torch.Tensor:
        """Causal attention inside each segment (paper eq. 2), token-major layout. q: (B, T, h, Dh) are
        the last T of the L = p + T positions of k, v: (B, L, hkv, Dh), which start on a segment
        boundary. Returns (B, T, h, Dh)."""
        B, L, hkv, Dh = k.shape
        h, S, T = q.shape[2], self.config.segment_length, q.shape[1]
        softmax = self.config.local_attention == "softmax"
        if not softmax and hkv != h:  # linear attention has no GQA kernel: repeat the kv heads
            k, v = k.repeat_interleave(h // hkv, dim=2), v.repeat_interleave(h // hkv, dim=2)
            hkv = h
        if softmax and L <= S:  # all queries in one segment (streaming, decoding): no padding needed
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p, 0, Dh**-0.5)
            return out.transpose(1, 2)
        n = -(-L // S)
        pad = n * S - L
        if p or pad:
            # front-pad q to align it with k; end-pad everything to whole segments. Padded keys sit
            # after every real query (invisible under the causal mask); padded query rows are dropped.
            q, k, v = F.pad(q, (0, 0, 0, 0, p, pad)), F.pad(k, (0, 0, 0, 0, 0, pad)), F.pad(v, (0, 0, 0, 0, 0, pad))
        # segments become batch entries: (B, n*S, heads, Dh) -> (B*n, heads, S, Dh), a view when unpadded
        seg = lambda t: t.view(B, n, S, t.shape[2], Dh).transpose(2, 3).reshape(B * n, t.shape[2], S, Dh)  # noqa: E731
        qs, ks, vs = seg(q), seg(k), seg(v)
        if softmax:
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=Dh**-0.5, enable_gqa=hkv != h)
        else:
            out, _ = causal_linear_attention(qs, ks, vs, scale=Dh**-0.5, eps=self.config.memory_eps,
                                             chunk_size=min(self.config.linear_chunk_size, S))
        return out.view(B, n, h, S, Dh).transpose(2, 3).reshape(B, n * S, h, Dh)[:, p:p + T]

    def forward(self, x: torch.Tensor, state=None):
        c = self.config
        B, T, _ = x.shape
        h, hkv, Dh, Hm, Dm = self.heads, self.kv_heads, self.head_dim, c.memory_heads, c.memory_dim
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        self.check_state(state, B)
        q, k, v = self.project(x)  # (B, T, h Dh), (B, T, hkv Dh) x 2
        p = state.segment_k.shape[1]
        if p:  # keys/values of the current segment's earlier tokens come first: (B, L, hkv Dh), L = p + T
            k_all = torch.cat((state.segment_k.to(k.dtype), k), dim=1)
            v_all = torch.cat((state.segment_v.to(v.dtype), v), dim=1)
        else:
            k_all, v_all = k, v
        L = p + T
        heads = lambda t, n, D: t.view(B, t.shape[1], n, D)  # noqa: E731  (B, *, n, D), token-major
        a_loc = self.tap_local(self.local_attention(heads(q, h, Dh), heads(k_all, hkv, Dh), heads(v_all, hkv, Dh), p))
        g = self.tap_gate(torch.sigmoid(self.beta).to(a_loc.dtype).view(1, 1, h, 1))
        if self.memory_enabled:
            k_mem, v_mem = k_all, v_all
            if hkv != h:  # the memory sees every query head's key/value: repeat the GQA groups
                k_mem = heads(k_all, hkv, Dh).repeat_interleave(h // hkv, dim=2).flatten(2)
                v_mem = heads(v_all, hkv, Dh).repeat_interleave(h // hkv, dim=2).flatten(2)
            a_mem, fields = self.memory.scan(x, *(heads(t, Hm, Dm).transpose(1, 2) for t in (q, k_mem, v_mem)),
                                             state)
            a_mem = self.tap_memory_read(a_mem.transpose(1, 2).reshape(B, T, h, Dh))  # memory heads -> attention heads
            a = torch.lerp(a_loc, a_mem, g)  # eq. 6: A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_loc
            state = state._replace(**fields)
        else:
            a = (1 - g) * a_loc  # memory switched off: A_mem = 0, gate unchanged
        done = L - L % c.segment_length  # tokens of completed segments; the rest stays in the state
        new_state = state._replace(segment_k=k_all[:, done:].clone(), segment_v=v_all[:, done:].clone())
        return self.output(a.reshape(B, T, h * Dh)), new_state


class MemoryLayer(Block):
    """A block (`config.block`: neox or llama) around a MemoryMixer with the class's `memory_part`.
    The layer types (InfiniLayer, MultiMemoryLayer, HierarchicalLayer) set config_class,
    state_type and memory_part; nothing else."""

    has_compressive_memory = True
    memory_part: ClassVar[type[MemoryPart]]

    def __init__(self, *args, config=None, **kwargs):
        c = resolve_config(self.config_class, config, args, kwargs)
        mixer = MemoryMixer(c, self.memory_part(c), self.state_type)
        neox = c.block == "neox"
        super().__init__(c, mixer, style=c.block, norm_eps=c.layer_norm_eps if neox else c.rms_norm_eps,
                         hidden_act=c.hidden_act, mlp_bias=c.mlp_bias, parallel_residual=neox and c.use_parallel_residual)
