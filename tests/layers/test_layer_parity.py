"""PythiaLayer == transformers' GPTNeoXLayer and LlamaLayer == LlamaDecoderLayer, one layer at a time.

Same weights copied in; forward outputs agree to 1e-5 and gradients w.r.t. the input to 1e-4
(fp32). A KV-cache continuation (prefix, then the rest with the cache carried) is compared with the
reference layer driven by a `DynamicCache` and an explicit mask.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from newllm.models.layers import LlamaLayer, PythiaLayer

B, T, T0 = 2, 23, 9  # batch, tokens, prefix length of the cache test
FWD_ATOL, GRAD_ATOL = 1e-5, 1e-4



def randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)


def copy_weights(ref: torch.nn.Module, ours: torch.nn.Module) -> None:
    """Our layers carry transformers' parameter names: the state dict loads as it is."""
    ours.load_state_dict(ref.state_dict(), strict=True)


def neox_pair(rotary_pct: float, parallel: bool):
    cfg = transformers.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96,
                                     rotary_pct=rotary_pct, rotary_emb_base=1000.0,
                                     use_parallel_residual=parallel, layer_norm_eps=1e-4)
    cfg._attn_implementation = "sdpa"
    ref = GPTNeoXLayer(cfg, layer_idx=0).eval()
    randomise(ref, 0)
    ours = PythiaLayer(64, 4, 96, rotary_pct=rotary_pct, rotary_emb_base=1000.0, use_parallel_residual=parallel,
                       layer_norm_eps=1e-4).eval()
    copy_weights(ref, ours)
    rope = GPTNeoXRotaryEmbedding(cfg)

    def run_ref(x, positions, mask=None, cache=None):
        return ref(x, attention_mask=mask, position_embeddings=rope(x, positions[None]), layer_past=cache,
                   use_cache=cache is not None)

    return ours, run_ref


def llama_pair(gqa: bool, bias: bool = False):
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                                   intermediate_size=80, rope_theta=500.0, rms_norm_eps=1e-4,
                                   attention_bias=bias, mlp_bias=bias)
    cfg._attn_implementation = "sdpa"
    ref = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    randomise(ref, 1)
    ours = LlamaLayer(64, 4, 80, num_key_value_heads=2 if gqa else 4, rope_theta=500.0, rms_norm_eps=1e-4,
                      attention_bias=bias, mlp_bias=bias).eval()
    copy_weights(ref, ours)
    rope = LlamaRotaryEmbedding(cfg)

    def run_ref(x, positions, mask=None, cache=None):
        return ref(x, attention_mask=mask, position_embeddings=rope(x, positions[None]), past_key_values=cache,
                   use_cache=cache is not None)

    return ours, run_ref


PAIRS = {
    **{f"pythia-rot{int(p * 100)}-{'parallel' if par else 'sequential'}": (neox_pair, (p, par))
       for p in (0.25, 1.0) for par in (True, False)},
    "llama-gqa": (llama_pair, (True,)),
    "llama-mha": (llama_pair, (False,)),
    "llama-bias": (llama_pair, (True, True)),
}


def make(case):
    build, args = PAIRS[case]
    return build(*args)


def inputs(seed=2):
    return torch.randn(B, T, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(PAIRS))
def test_forward_and_input_gradient_equal_transformers(case):
    ours, run_ref = make(case)
    x1 = inputs().requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_ours, _ = ours(x1)
    y_ref = run_ref(x2, torch.arange(T))
    assert (y_ref - x2).abs().max() > 0.1  # the layer does something measurable
    torch.testing.assert_close(y_ours, y_ref, atol=FWD_ATOL, rtol=0)
    w = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(3))  # a generic cotangent
    (y_ours * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=GRAD_ATOL, rtol=0)


@pytest.mark.parametrize("case", list(PAIRS))
def test_kv_cache_continuation_equals_dynamic_cache(case):
    """Prefix of T0 tokens, then T - T0 tokens with the cache: ours (KVCache) vs theirs (DynamicCache).

    transformers' SDPA path needs an explicit mask when queries continue a cache (with no mask it
    would treat the call as a fresh causal prefill), so the (T-T0, T) causal mask is given.
    """
    ours, run_ref = make(case)
    x = inputs(4)
    with torch.no_grad():
        a, state = ours(x[:, :T0])
        b, _ = ours(x[:, T0:], state)
        cache = DynamicCache()
        ra = run_ref(x[:, :T0], torch.arange(T0), cache=cache)
        pos = torch.arange(T0, T)
        mask = (torch.arange(T)[None, :] <= pos[:, None])[None, None].expand(B, 1, T - T0, T)
        rb = run_ref(x[:, T0:], pos, mask=mask, cache=cache)
    torch.testing.assert_close(a, ra, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(b, rb, atol=FWD_ATOL, rtol=0)
    assert int(state.pos) == T0 and state.k.shape[-2] == T0


@pytest.mark.parametrize("rotary", [0, 4, 16], ids=["R0", "R4", "R16-full"])
def test_split_qkv_rope_is_bit_equal_to_split_then_rope(rotary):
    """The fused op PythiaLayer uses == view/transpose/split + `apply_rope`, to the bit, fwd and bwd."""
    from newllm.models.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq, split_qkv_rope

    Bq, Tq, h, Dh = 2, 13, 3, 16
    cos, sin = rope_cos_sin(rope_inv_freq(rotary, 100.0), torch.arange(5, 5 + Tq), torch.float32)
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(Bq, Tq, 3 * h * Dh, generator=g, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    fused = split_qkv_rope(x1, h, cos, sin)
    q, k, v = x2.view(Bq, Tq, h, 3 * Dh).transpose(1, 2).split(Dh, dim=-1)
    ref = (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    for a, b in zip(fused, ref):
        assert a.shape == (Bq, h, Tq, Dh) and torch.equal(a, b)
    ws = [torch.randn(Bq, h, Tq, Dh, generator=g) for _ in range(3)]
    sum((a * w).sum() for a, w in zip(fused, ws)).backward()
    sum((b * w).sum() for b, w in zip(ref, ws)).backward()
    assert torch.equal(x1.grad, x2.grad)
