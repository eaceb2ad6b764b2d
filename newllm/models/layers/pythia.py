"""PythiaLayer: the GPT-NeoX decoder layer, numerically equal to `transformers`' GPTNeoXLayer.

    parallel residual (use_parallel_residual=True, Pythia's default):
        x ──┬── ln1 ── attn ──┐
            ├── ln2 ── mlp  ──┤
            └─────────────────+──> y = x + attn(ln1(x)) + mlp(ln2(x))
    sequential residual:
        h = x + attn(ln1(x));  y = h + mlp(ln2(h))

Attention: fused QKV projection whose output is interleaved per head ((B, T, h, 3*Dh): q, k, v of
head 0, then of head 1, ...), rotary on the first `rotary_pct` of each head (rotate-half), causal
softmax with scale 1/sqrt(Dh). State: the KV cache (`KVCache`), bounded by `sliding_window`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.base import BaseLayer, KVCache, check_positive, extend_kv_cache, register_layer, resolve_config
from newllm.models.ops.attention import causal_attention
from newllm.models.ops.rope import rope_cos_sin, rope_inv_freq, split_qkv_rope

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, what GPT-NeoX's "gelu" means
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class PythiaLayerConfig:
    hidden_size: int = 512  # Pythia-70m
    num_attention_heads: int = 8
    intermediate_size: int = 2048  # 4 x hidden
    rotary_pct: float = 0.25  # fraction of each head that is rotated
    rotary_emb_base: float = 10000.0
    use_parallel_residual: bool = True
    layer_norm_eps: float = 1e-5
    attention_bias: bool = True
    hidden_act: str = "gelu"
    sliding_window: int | None = None  # None: full causal attention; W: each query sees W keys
    initializer_range: float = 0.02

    def __post_init__(self):
        check_positive("PythiaLayer", hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                       intermediate_size=self.intermediate_size, layer_norm_eps=self.layer_norm_eps)
        if self.hidden_size % self.num_attention_heads:
            raise NewLLMError(f"PythiaLayer: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise NewLLMError(f"PythiaLayer: rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.hidden_act not in ACTIVATIONS:
            raise NewLLMError(f"PythiaLayer: unknown hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        if self.sliding_window is not None:
            check_positive("PythiaLayer", sliding_window=self.sliding_window)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)  # as transformers: truncate


class NeoXBlock(BaseLayer):
    """The GPT-NeoX block around an attention: y = x + attention(ln1(x)) + mlp(ln2(x)) (parallel
    residual) or h = x + attention(ln1(x)), y = h + mlp(ln2(h)). It owns the parameters under
    GPT-NeoX's names (input_layernorm, post_attention_layernorm, query_key_value, dense,
    dense_h_to_4h, dense_4h_to_h); a subclass supplies `attention(x, state) -> (out, new_state)`,
    `out` already through `dense`. PythiaLayer and the memory layers (InfiniLayer and its kin) are
    NeoX blocks, which is why a memory layer takes a PythiaLayer's place in a stack."""

    def __init__(self, config):
        super().__init__(config)
        d, c = config.hidden_size, config
        self.input_layernorm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.query_key_value = nn.Linear(d, 3 * d, bias=c.attention_bias)
        self.dense = nn.Linear(d, d, bias=c.attention_bias)
        self.dense_h_to_4h = nn.Linear(d, c.intermediate_size)
        self.dense_4h_to_h = nn.Linear(c.intermediate_size, d)
        self.act = ACTIVATIONS[c.hidden_act]
        for lin in (self.query_key_value, self.dense, self.dense_h_to_4h, self.dense_4h_to_h):
            nn.init.normal_(lin.weight, std=c.initializer_range)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))

    def forward(self, x: torch.Tensor, state=None):
        attn, new_state = self.attention(self.input_layernorm(x), state)
        if self.config.use_parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x)), new_state
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), new_state


@register_layer("pythia")
class PythiaLayer(NeoXBlock):
    config_class = PythiaLayerConfig

    def __init__(self, *args, config: PythiaLayerConfig | None = None, **kwargs):
        config = resolve_config(PythiaLayerConfig, config, args, kwargs,
                                ("hidden_size", "num_attention_heads", "intermediate_size"))
        super().__init__(config)
        c = config
        self.register_buffer("inv_freq", rope_inv_freq(c.rotary_ndims, c.rotary_emb_base), persistent=False)

    def attention(self, x: torch.Tensor, state: KVCache | None):
        B, T, d = x.shape
        h, Dh = self.config.num_attention_heads, self.config.head_size
        qkv = self.query_key_value(x)  # (B, T, 3*d), interleaved per head
        start = 0 if state is None else int(state.pos)
        if self.config.rotary_ndims:
            cos, sin = rope_cos_sin(self.inv_freq, torch.arange(start, start + T, device=x.device), qkv.dtype)
            q, k, v = split_qkv_rope(qkv, h, cos, sin)  # (B, h, T, Dh) each, one fused autograd node
        else:
            q, k, v = qkv.view(B, T, h, 3 * Dh).transpose(1, 2).split(Dh, dim=-1)
        k_all, v_all, k_start, new_state = extend_kv_cache(state, k, v, self.config.sliding_window)
        out = causal_attention(q, k_all, v_all, start, k_start, Dh**-0.5, self.config.sliding_window)
        return self.dense(out.transpose(1, 2).reshape(B, T, d)), new_state
