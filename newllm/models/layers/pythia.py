"""PythiaLayer: the GPT-NeoX decoder layer, numerically equal to `transformers`' GPTNeoXLayer.

    neox block (blocks.py) + SoftmaxAttention (attention.py) with GPT-NeoX's fused, per-head
    interleaved QKV and partial rotary embeddings:

    parallel residual (use_parallel_residual=True, Pythia's default):
        x ──┬── ln1 ── attention ──┐
            ├── ln2 ── mlp ────────┤
            └──────────────────────+──> y = x + attention(ln1(x)) + mlp(ln2(x))
    sequential residual:
        h = x + attention(ln1(x));  y = h + mlp(ln2(h))

Rotary on the first `rotary_pct` of each head (rotate-half, base `rotary_emb_base`), causal
softmax with scale 1/sqrt(Dh). State: the KV cache (`KVCache`), bounded by `sliding_window`.
"""
from __future__ import annotations

from dataclasses import dataclass

from newllm.errors import NewLLMError
from newllm.models.layers.attention import KVCache, SoftmaxAttention, check_window
from newllm.models.layers.base import check_positive, register_layer, resolve_config
from newllm.models.layers.blocks import ACTIVATIONS, Block


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
    attention_sinks: int = 0  # with a window: the first s tokens stay visible to every query (StreamingLLM)
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
        check_window("PythiaLayer", self.sliding_window, self.attention_sinks)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)  # as transformers: truncate


@register_layer("pythia")
class PythiaLayer(Block):
    config_class = PythiaLayerConfig
    state_type = KVCache

    def __init__(self, *args, config: PythiaLayerConfig | None = None, **kwargs):
        c = resolve_config(PythiaLayerConfig, config, args, kwargs)
        h = c.num_attention_heads
        mixer = SoftmaxAttention(style="neox", hidden_size=c.hidden_size, num_heads=h, num_kv_heads=h,
                                 head_dim=c.head_size, bias=c.attention_bias, rotary_ndims=c.rotary_ndims,
                                 rope_base=c.rotary_emb_base, sliding_window=c.sliding_window,
                                 sinks=c.attention_sinks)
        super().__init__(c, mixer, style="neox", norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act,
                         mlp_bias=True, parallel_residual=c.use_parallel_residual)
