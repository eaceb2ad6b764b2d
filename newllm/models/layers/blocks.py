"""Blocks and the token-mixer base: every layer type is a `Block` holding one `TokenMixer`.

A block is norm(s) + token mixer + MLP + residual, in one of two styles::

    "neox"  (GPT-NeoX / Pythia)  LayerNorm, GELU MLP (dense_h_to_4h, dense_4h_to_h)
        parallel residual:   y = x + mixer(ln1(x)) + mlp(ln2(x))
        sequential residual: h = x + mixer(ln1(x));  y = h + mlp(ln2(h))
    "llama" (Llama / SmolLM2)    RMSNorm, SwiGLU MLP (gate_proj, up_proj, down_proj)
        h = x + mixer(rms1(x));  y = h + down(silu(gate(rms2(h))) * up(rms2(h)))

A token mixer mixes positions and carries the state: softmax attention with a KV cache
(`attention.py`) or a compressive-memory mixer (`memory.py`); any mixer sits in either block.
Parameter names are Hugging Face's for the style (`input_layernorm`, `post_attention_layernorm`,
the mixer as `attention` (neox) or `self_attn` (llama), `mlp.*`), so checkpoints map one to one.

What the block declares (state, gates, memory switch, positions, parameter groups) is its mixer's:
the rest of newllm asks the layer, and the layer answers for its mixer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.base import BaseLayer, StateField, check_state_fields, empty_state

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, what GPT-NeoX's "gelu" means
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
STYLES = ("neox", "llama")
MIXER_NAME = {"neox": "attention", "llama": "self_attn"}  # Hugging Face's module names


class Tap(nn.Identity):
    """A hookable point inside a forward: returns its input unchanged (no parameters, no numerics).
    `newllm.diagnostics` hooks these to see tensors that are no module's output (q/k after RoPE,
    a memory mixer's read-out, local part and gate)."""


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


class NeoXMLP(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x)))."""

    def __init__(self, d: int, inner: int, act: str, bias: bool):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(d, inner, bias=bias)
        self.dense_4h_to_h = nn.Linear(inner, d, bias=bias)
        self.act = ACTIVATIONS[act]

    def linears(self) -> list[nn.Linear]:
        return [self.dense_h_to_4h, self.dense_4h_to_h]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class SwiGLU(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)), act = silu for Llama."""

    def __init__(self, d: int, inner: int, act: str, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(d, inner, bias=bias)
        self.up_proj = nn.Linear(d, inner, bias=bias)
        self.down_proj = nn.Linear(inner, d, bias=bias)
        self.act = ACTIVATIONS[act]

    def linears(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj, self.down_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TokenMixer(nn.Module):
    """Base of the token mixers: the q/k/v/o projections under the block style's names, and the
    capability defaults a `Block` answers with (see `base.BaseLayer`).

    Projections: "neox" style is one fused `query_key_value` (d -> 3 h Dh) and `dense`; "llama"
    style is `q_proj`, `k_proj`, `v_proj` (hkv heads: grouped-query attention) and `o_proj`.
    """

    state_type: type | None = None
    has_compressive_memory: bool = False

    def build_projections(self, style: str, d: int, heads: int, kv_heads: int, head_dim: int, bias: bool) -> None:
        if style not in STYLES:
            raise NewLLMError(f"block must be one of {STYLES}, got {style!r}")
        if style == "neox" and kv_heads != heads:
            raise NewLLMError(f"the neox block has one fused QKV projection and no grouped-query attention: "
                              f"num_key_value_heads {kv_heads} != num_attention_heads {heads} needs block='llama'")
        self.style, self.heads, self.kv_heads, self.head_dim = style, heads, kv_heads, head_dim
        if style == "neox":
            self.query_key_value = nn.Linear(d, 3 * heads * head_dim, bias=bias)
            self.dense = nn.Linear(heads * head_dim, d, bias=bias)
        else:
            self.q_proj = nn.Linear(d, heads * head_dim, bias=bias)
            self.k_proj = nn.Linear(d, kv_heads * head_dim, bias=bias)
            self.v_proj = nn.Linear(d, kv_heads * head_dim, bias=bias)
            self.o_proj = nn.Linear(heads * head_dim, d, bias=bias)

    def projections(self) -> list[nn.Linear]:
        """The projections in the order the block initialises them (Hugging Face's order)."""
        if self.style == "neox":
            return [self.query_key_value, self.dense]
        return [self.q_proj, self.k_proj, self.v_proj, self.o_proj]

    def project(self, x: torch.Tensor):
        """q (B, T, h Dh), k and v (B, T, hkv Dh). The neox fused projection is read as [q | k | v]
        (what the memory mixers use; GPT-NeoX's per-head interleaving is SoftmaxAttention's)."""
        if self.style == "neox":
            return self.query_key_value(x).chunk(3, dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def output(self, a: torch.Tensor) -> torch.Tensor:
        """The output projection of (B, T, h Dh)."""
        return self.dense(a) if self.style == "neox" else self.o_proj(a)

    def init_parameters(self) -> None:
        """Initialise what the block's normal(0, initializer_range) pass over the projections does not."""

    # capability defaults (BaseLayer's, answered for the block)
    def state_spec(self) -> dict[str, StateField]:
        return {}

    def init_state(self, batch_size: int, device=None, dtype=None):
        return None if self.state_type is None else empty_state(self.state_type, self.state_spec(), batch_size,
                                                                 device, dtype)

    def check_state(self, state, batch_size: int | None = None) -> None:
        check_state_fields(type(self).__name__, self.state_spec(), state, batch_size)

    def tokens_absorbed(self, state) -> int | None:
        return None

    memory_enabled: bool = False
    memory_segment_length: int | None = None
    uses_positions: bool = False
    attention_span: int | None = None

    def gates(self) -> dict[str, torch.Tensor]:
        return {}

    def token_gates(self) -> dict[str, nn.Module]:
        return {}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}


class Block(BaseLayer):
    """Norms + token mixer + MLP + residual (module docstring). The layer types build one:
    `PythiaLayer` = neox block + softmax attention, `InfiniLayer` = neox or llama block + Infini
    memory mixer, and so on."""

    def __init__(self, config, mixer: TokenMixer, *, style: str, norm_eps: float, hidden_act: str,
                 mlp_bias: bool, parallel_residual: bool = False):
        super().__init__(config)
        d = config.hidden_size
        if style not in STYLES:
            raise NewLLMError(f"{type(self).__name__}: block must be one of {STYLES}, got {style!r}")
        if hidden_act not in ACTIVATIONS:
            raise NewLLMError(f"{type(self).__name__}: unknown hidden_act {hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        norm = (lambda: nn.LayerNorm(d, eps=norm_eps)) if style == "neox" else (lambda: RMSNorm(d, norm_eps))
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.mixer_name = MIXER_NAME[style]
        self.add_module(self.mixer_name, mixer)
        mlp = NeoXMLP if style == "neox" else SwiGLU
        self.mlp = mlp(d, config.intermediate_size, hidden_act, mlp_bias)
        self.parallel_residual = parallel_residual
        # transformers' _init_weights: normal(0, initializer_range) on every projection, zero biases;
        # the order (mixer, then MLP) is the order of the random draws, so a seed gives one model
        for lin in mixer.projections() + self.mlp.linears():
            nn.init.normal_(lin.weight, std=config.initializer_range)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        mixer.init_parameters()

    @property
    def mixer(self) -> TokenMixer:
        return self._modules[self.mixer_name]

    def forward(self, x: torch.Tensor, state=None):
        a, new_state = self.mixer(self.input_layernorm(x), state)
        if self.parallel_residual:
            return x + a + self.mlp(self.post_attention_layernorm(x)), new_state
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), new_state

    # ------------------------------------------------------------------ capabilities: the mixer's
    @property
    def state_type(self):
        return self.mixer.state_type

    def state_spec(self) -> dict[str, StateField]:
        return self.mixer.state_spec()

    def check_state(self, state, batch_size: int | None = None) -> None:
        self.mixer.check_state(state, batch_size)

    def tokens_absorbed(self, state) -> int | None:
        return self.mixer.tokens_absorbed(state)

    @property
    def memory_enabled(self) -> bool:
        return self.mixer.memory_enabled

    @memory_enabled.setter
    def memory_enabled(self, enabled: bool) -> None:
        if not self.has_compressive_memory:
            BaseLayer.memory_enabled.fset(self, enabled)  # the one-line "has no memory" error
        self.mixer.memory_enabled = bool(enabled)

    @property
    def memory_segment_length(self) -> int | None:
        return self.mixer.memory_segment_length

    def gates(self) -> dict[str, torch.Tensor]:
        return self.mixer.gates()

    def token_gates(self) -> dict[str, nn.Module]:
        return self.mixer.token_gates()

    @property
    def uses_positions(self) -> bool:
        return self.mixer.uses_positions

    @property
    def attention_span(self) -> int | None:
        return self.mixer.attention_span

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return self.mixer.param_groups()
