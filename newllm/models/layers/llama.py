"""LlamaLayer: the Llama decoder layer, numerically equal to `transformers`' LlamaDecoderLayer.

    h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1))),  n1 = rmsnorm1(x)
    y = h + down_proj(silu(gate_proj(n2)) * up_proj(n2)),                   n2 = rmsnorm2(h)

Grouped-query attention: `num_key_value_heads` key/value heads, each shared by
num_attention_heads / num_key_value_heads query heads. RoPE covers the whole head (theta =
`rope_theta`). State: the KV cache (`KVCache`), bounded by `sliding_window`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.base import BaseLayer, KVCache, check_positive, extend_kv_cache, register_layer, resolve_config
from newllm.models.ops.attention import causal_attention
from newllm.models.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as `transformers` does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass
class LlamaLayerConfig:
    hidden_size: int = 576  # SmolLM2-135M
    num_attention_heads: int = 9
    intermediate_size: int = 1536
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            check_positive("LlamaLayer", num_attention_heads=self.num_attention_heads)
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_positive("LlamaLayer", hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                       num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                       intermediate_size=self.intermediate_size, rms_norm_eps=self.rms_norm_eps)
        if self.num_attention_heads % self.num_key_value_heads:
            raise NewLLMError(f"LlamaLayer: num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise NewLLMError(f"LlamaLayer: head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None:
            check_positive("LlamaLayer", sliding_window=self.sliding_window)


@register_layer("llama")
class LlamaLayer(BaseLayer):
    config_class = LlamaLayerConfig

    def __init__(self, *args, config: LlamaLayerConfig | None = None, **kwargs):
        config = resolve_config(LlamaLayerConfig, config, args, kwargs,
                                ("hidden_size", "num_attention_heads", "intermediate_size"))
        super().__init__(config)
        c = config
        d, h, hkv, Dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.input_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.q_proj = nn.Linear(d, h * Dh, bias=c.attention_bias)
        self.k_proj = nn.Linear(d, hkv * Dh, bias=c.attention_bias)
        self.v_proj = nn.Linear(d, hkv * Dh, bias=c.attention_bias)
        self.o_proj = nn.Linear(h * Dh, d, bias=c.attention_bias)
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=c.mlp_bias)
        self.register_buffer("inv_freq", rope_inv_freq(Dh, c.rope_theta), persistent=False)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=c.initializer_range)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def attention(self, x: torch.Tensor, state: KVCache | None):
        B, T, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)  # (B, h, T, Dh)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)  # (B, hkv, T, Dh)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        start = 0 if state is None else int(state.pos)
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(start, start + T, device=x.device), q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all, k_start, new_state = extend_kv_cache(state, k, v, c.sliding_window)
        out = causal_attention(q, k_all, v_all, start, k_start, c.head_dim**-0.5, c.sliding_window)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), new_state

    def forward(self, x: torch.Tensor, state: KVCache | None = None):
        attn, new_state = self.attention(self.input_layernorm(x), state)
        h = x + attn
        n = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n)), new_state
