"""LlamaLayer: the Llama decoder layer, numerically equal to `transformers`' LlamaDecoderLayer.

    llama block (blocks.py) + SoftmaxAttention (attention.py) with separate q/k/v/o projections:

    h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1))),  n1 = rmsnorm1(x)
    y = h + down_proj(silu(gate_proj(n2)) * up_proj(n2)),                   n2 = rmsnorm2(h)

Grouped-query attention: `num_key_value_heads` key/value heads, each shared by
num_attention_heads / num_key_value_heads query heads. RoPE covers the whole head (theta =
`rope_theta`). State: the KV cache (`KVCache`), bounded by `sliding_window`.
"""
from __future__ import annotations

from dataclasses import dataclass

from newllm.errors import NewLLMError
from newllm.models.layers.attention import KVCache, SoftmaxAttention, check_window
from newllm.models.layers.base import check_positive, register_layer, resolve_config
from newllm.models.layers.blocks import Block


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
    sliding_window: int | None = None  # None: full causal attention; W: each query sees W keys
    attention_sinks: int = 0  # with a window: the first s tokens stay visible to every query (StreamingLLM)
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            check_positive("LlamaLayer", num_attention_heads=self.num_attention_heads)
            if self.hidden_size % self.num_attention_heads:
                raise NewLLMError(f"LlamaLayer: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                  f"{self.num_attention_heads} (give head_dim to use heads of another size)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_positive("LlamaLayer", hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                       num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                       intermediate_size=self.intermediate_size, rms_norm_eps=self.rms_norm_eps)
        if self.num_attention_heads % self.num_key_value_heads:
            raise NewLLMError(f"LlamaLayer: num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise NewLLMError(f"LlamaLayer: head_dim must be even for RoPE, got {self.head_dim}")
        check_window("LlamaLayer", self.sliding_window, self.attention_sinks)


@register_layer("llama")
class LlamaLayer(Block):
    config_class = LlamaLayerConfig
    state_type = KVCache

    tiny_options = {"num_key_value_heads": 2}  # exercise GQA

    def __init__(self, *args, config: LlamaLayerConfig | None = None, **kwargs):
        c = resolve_config(LlamaLayerConfig, config, args, kwargs)
        mixer = SoftmaxAttention(style="llama", hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                                 num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, bias=c.attention_bias,
                                 rotary_ndims=c.head_dim, rope_base=c.rope_theta, sliding_window=c.sliding_window,
                                 sinks=c.attention_sinks)
        super().__init__(c, mixer, style="llama", norm_eps=c.rms_norm_eps, hidden_act="silu", mlp_bias=c.mlp_bias)
