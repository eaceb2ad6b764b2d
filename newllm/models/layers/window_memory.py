"""WindowMemoryLayer: softmax attention over the last W tokens plus a linear-attention memory of every
older token, under one normaliser (LoLCATs, arXiv 2410.10254, eq. 7), in a Llama block.

    q, k, v = q_proj, k_proj, v_proj (x);  q, k = rope(q), rope(k)          RoPE kept (unlike Infini)
    window:  a_tj = w * exp(q_t . k_j / sqrt(Dh) - m_t)        t - W < j <= t, or j < s (the sinks)
    memory:  b_tj = l * phi(q_t) . phi(k_j)                    s <= j <= t - W (every older token)
    y_t     = (sum_j a_tj v_j + sum_j b_tj v_j) / (sum_j a_tj + sum_j b_tj + eps)
    out     = o_proj(y)

w = sigmoid(window_factor) per head (init `window_factor_init`: sigmoid(-2.197) = 0.1, LoLCATs'),
l = 1 - w with `affine_factors`, else 1. phi is a feature map on each head of the rotated q/k:
"hedgehog", [softmax(x W) | softmax(-x W)] with a learned (Dh x F) W per head initialised to the
identity (Hedgehog / LoLCATs; 2F features), or "elu", elu(x) + 1 (Infini's sigma).

Why this shape for a retrofit: the window part is the pretrained layer's own attention, unchanged,
for the last W tokens (Q/K/V/O and RoPE copied, so at a window the size of the context the layer is
the original); only what falls out of the window goes through the memory, whose feature maps are
trained to make the combination match the original attention (attention transfer). The state is a
fixed-size memory plus the last W - 1 keys/values, whatever the stream length.

With `attention_sinks` s the first s tokens stay in the softmax part (StreamingLLM's sinks): at
SmolLM2's layer 15 four sinks alone recover as much as the memory (docs/retrofit.md), so the two
are combined rather than compared.

Numerics: the memory is fp32 and its features are softmax-normalised (Hedgehog) or elu + 1, so
it is bounded by the values it sums; a write whose update holds a NaN/Inf is skipped for that batch
row, with a warning, and counted in the state (`skipped`), as in the Infini memory.

State (`WindowMemoryState`): the window's rotated keys and values (B, hkv, <= s + W-1, Dh; the sinks
first), the memory
`kv` = sum phi(k_j)^T v_j (B, h, 2F or Dh, Dh) and `k_sum` = sum phi(k_j) (B, h, 2F or Dh) over the
tokens that left the window (fp32), and the next position. A token is written into the memory when
it leaves the window, so one call equals any split.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.attention import cache_positions
from newllm.models.layers.base import StateField, check_positive, register_layer, resolve_config
from newllm.models.layers.blocks import Block, TokenMixer
from newllm.models.ops.memory import guard_update
from newllm.models.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq

FEATURE_MAPS = ("hedgehog", "elu")


@dataclass
class WindowMemoryLayerConfig:
    hidden_size: int = 576  # SmolLM2-135M
    num_attention_heads: int = 9
    intermediate_size: int = 1536
    num_key_value_heads: int | None = None  # None: = num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    mlp_bias: bool = False
    window: int = 64  # W: keys each query attends to with softmax (itself included)
    attention_sinks: int = 0  # s: the first s tokens stay in the softmax part for every query (StreamingLLM)
    feature_map: str = "hedgehog"  # "hedgehog" (learned, init identity) or "elu" (elu + 1)
    window_factor_init: float = -2.197  # w = sigmoid(init) = 0.1 (LoLCATs)
    affine_factors: bool = False  # l = 1 - w instead of 1
    memory_eps: float = 1e-12  # guard of the shared normaliser
    check_finite: bool = True  # skip (warn, count in the state's `skipped`) a memory write holding NaN/Inf
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_positive("WindowMemoryLayer", hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                       num_key_value_heads=self.num_key_value_heads, intermediate_size=self.intermediate_size,
                       window=self.window, rms_norm_eps=self.rms_norm_eps, memory_eps=self.memory_eps)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise NewLLMError(f"WindowMemoryLayer: hidden_size {self.hidden_size}, num_attention_heads "
                              f"{self.num_attention_heads} and num_key_value_heads {self.num_key_value_heads} "
                              "must divide one another")
        if self.attention_sinks < 0:
            raise NewLLMError(f"WindowMemoryLayer: attention_sinks must be >= 0, got {self.attention_sinks}")
        if self.feature_map not in FEATURE_MAPS:
            raise NewLLMError(f"WindowMemoryLayer: feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class WindowMemoryState(NamedTuple):
    k: torch.Tensor  # (B, hkv, P <= s + W-1, Dh): rotated keys of the sinks and the window
    v: torch.Tensor  # (B, hkv, P, Dh)
    kv: torch.Tensor  # (B, h, F, Dh) fp32: sum phi(k)^T v of the tokens that left the window
    k_sum: torch.Tensor  # (B, h, F) fp32: sum phi(k)
    pos: torch.Tensor  # () int64: position of the next token
    skipped: torch.Tensor  # () int64: memory writes skipped for NaN/Inf (one per batch row and call)


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W) | softmax(-x W)] per head, W (h, Dh, Dh) initialised to the identity."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim).expand(heads, dim, dim).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, h, T, Dh) -> (B, h, T, 2 Dh) fp32
        z = torch.einsum("bhtd,hdf->bhtf", x.float(), self.weight.float())
        return torch.cat((z.softmax(-1), (-z).softmax(-1)), dim=-1)


class EluFeatureMap(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.elu(x.float()) + 1.0


class WindowMemoryMixer(TokenMixer):
    """The mixer of the module docstring (llama-style projections, GQA)."""

    state_type = WindowMemoryState
    has_compressive_memory = True
    uses_positions = True

    def __init__(self, c: WindowMemoryLayerConfig):
        super().__init__()
        self.config = c
        self.build_projections("llama", c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                               c.attention_bias)
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)
        self.feature_map = (HedgehogFeatureMap(c.num_attention_heads, c.head_dim) if c.feature_map == "hedgehog"
                            else EluFeatureMap())
        self.window_factor = nn.Parameter(torch.full((c.num_attention_heads,), float(c.window_factor_init)))
        self.memory_enabled = True

    @property
    def feature_dim(self) -> int:
        return 2 * self.head_dim if self.config.feature_map == "hedgehog" else self.head_dim

    @property
    def memory_segment_length(self) -> int:
        return self.config.window  # the memory holds what is older than the window

    def state_spec(self) -> dict[str, StateField]:
        kv = StateField((self.kv_heads, None, self.head_dim))
        h, F = self.heads, self.feature_dim
        return {"k": kv, "v": kv, "kv": StateField((h, F, self.head_dim), torch.float32),
                "k_sum": StateField((h, F), torch.float32), "pos": StateField((), torch.long, batched=False),
                "skipped": StateField((), torch.long, batched=False)}

    def tokens_absorbed(self, state) -> int:
        return int(state.pos)

    def gates(self) -> dict[str, torch.Tensor]:
        return {"window": torch.sigmoid(self.window_factor.detach().float())}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"gates": [self.window_factor]}

    def forward(self, x: torch.Tensor, state: WindowMemoryState | None = None):
        c = self.config
        B, T, _ = x.shape
        h, hkv, Dh, W = self.heads, self.kv_heads, self.head_dim, c.window
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        self.check_state(state, B)
        start = int(state.pos)
        q, k, v = self.project(x)
        q = q.view(B, T, h, Dh).transpose(1, 2)
        k = k.view(B, T, hkv, Dh).transpose(1, 2)
        v = v.view(B, T, hkv, Dh).transpose(1, 2)
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(start, start + T, device=x.device), q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = torch.cat((state.k.to(k.dtype), k), dim=2), torch.cat((state.v.to(v.dtype), v), dim=2)
        S0 = c.attention_sinks
        rep = lambda t: t.repeat_interleave(h // hkv, dim=1) if hkv != h else t  # noqa: E731  GQA groups
        kh, vh = rep(k_all).float(), rep(v_all).float()
        pos_q = torch.arange(start, start + T, device=x.device)[:, None]
        pos_k = torch.cat((cache_positions(state.k.shape[2], start, S0, x.device),
                           torch.arange(start, start + T, device=x.device)))[None, :]
        in_window = (pos_k <= pos_q) & ((pos_q - pos_k < W) | (pos_k < S0))
        older = (pos_q - pos_k >= W) & (pos_k >= S0)  # left the window inside this call: read through the memory
        s = (q.float() @ kh.transpose(-1, -2)) * Dh**-0.5  # (B, h, T, L)
        s = s.masked_fill(~in_window, float("-inf"))
        w = torch.sigmoid(self.window_factor.float()).view(1, h, 1, 1)
        lin = (1 - w) if c.affine_factors else torch.ones_like(w)
        a = w * torch.exp(s - s.amax(-1, keepdim=True))  # window: max-normalised softmax terms
        num, den = a @ vh, a.sum(-1, keepdim=True)
        fk = self.feature_map(kh)  # (B, h, L, F)
        if self.memory_enabled:
            fq = self.feature_map(q)  # (B, h, T, F)
            b = lin * (fq @ fk.transpose(-1, -2)) * older  # memory terms of this call's older tokens
            num = num + b @ vh + lin * (fq @ state.kv.float())
            den = den + b.sum(-1, keepdim=True) + lin * (fq @ state.k_sum.float().unsqueeze(-1))
        y = (num / (den + c.memory_eps)).to(x.dtype)  # (B, h, T, Dh)
        # tokens that leave the window before the next token (position start + T) enter the memory;
        # the sinks never leave
        end = start + T
        leaving = ((pos_k[0] < end - (W - 1)) & (pos_k[0] >= S0)).nonzero().flatten()
        kv, k_sum, skipped = state.kv, state.k_sum, state.skipped
        if self.memory_enabled and leaving.numel():
            fl, vl = fk.index_select(2, leaving), vh.index_select(2, leaving)
            dkv, dk = fl.transpose(-1, -2) @ vl, fl.sum(2)
            if c.check_finite:  # a batch row whose update holds a NaN/Inf keeps its old memory (seed 000)
                dkv, dk, bad = guard_update(dkv, dk, None, True)
                if bad.any():
                    skipped = skipped + int(bad.sum())
                    warnings.warn(f"WindowMemoryLayer: non-finite memory update in batch rows "
                                  f"{bad.nonzero().flatten().tolist()} skipped")
            kv, k_sum = kv + dkv, k_sum + dk
        keep = ((pos_k[0] < S0) | (pos_k[0] >= end - (W - 1))).nonzero().flatten()
        new_state = WindowMemoryState(k_all.index_select(2, keep), v_all.index_select(2, keep), kv, k_sum,
                                      torch.tensor(end, dtype=torch.long), skipped)
        return self.output(y.transpose(1, 2).reshape(B, T, h * Dh)), new_state


@register_layer("window_memory")
class WindowMemoryLayer(Block):
    config_class = WindowMemoryLayerConfig
    state_type = WindowMemoryState
    has_compressive_memory = True

    tiny_options = {"num_key_value_heads": 2, "window": 6, "attention_sinks": 2, "window_factor_init": 0.0}

    def __init__(self, *args, config: WindowMemoryLayerConfig | None = None, **kwargs):
        c = resolve_config(WindowMemoryLayerConfig, config, args, kwargs)
        super().__init__(c, WindowMemoryMixer(c), style="llama", norm_eps=c.rms_norm_eps, hidden_act="silu",
                         mlp_bias=c.mlp_bias)
