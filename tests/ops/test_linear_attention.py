"""causal_linear_attention (chunkwise) == naive_causal_linear_attention (per-token recurrence)."""
from __future__ import annotations

import pytest
import torch

from newllm import NewLLMError
from newllm.models.ops.linear_attention import LinearAttentionState, causal_linear_attention
from newllm.models.ops.memory import phi
from newllm.models.ops.naive import naive_causal_linear_attention

# id: (B, H, T, Dk, Dv, chunk, normalize, random initial state)
CASES = {
    "B2-T37-C8-norm": (2, 2, 37, 6, 5, 8, True, False),
    "B1-T37-C8-raw-init": (1, 3, 37, 4, 7, 8, False, True),
    "B3-T16-C16-norm-init": (3, 1, 16, 5, 5, 16, True, True),
    "B2-T5-C64-short": (2, 2, 5, 4, 4, 64, True, False),
}


def make(case, requires_grad=False):
    B, H, T, Dk, Dv, C, norm, init = case
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, T, Dk, generator=g) * 2, torch.randn(B, H, T, Dk, generator=g) * 2, \
        torch.randn(B, H, T, Dv, generator=g)
    fk = phi(torch.randn(B, H, 6, Dk, generator=g), 1.0)
    s0 = (fk.transpose(-1, -2) @ torch.randn(B, H, 6, Dv, generator=g), fk.sum(-2)) if init else \
        (torch.zeros(B, H, Dk, Dv), torch.zeros(B, H, Dk))
    tensors = [q, k, v, *s0]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors, dict(normalize=norm), C


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_chunkwise_equals_naive(case):
    (q, k, v, kv0, z0), kw, C = make(case)
    out, s = causal_linear_attention(q, k, v, LinearAttentionState(kv0, z0), chunk_size=C, **kw)
    ref, r = naive_causal_linear_attention(q, k, v, LinearAttentionState(kv0, z0), **kw)
    assert out.abs().amax() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.kv, r.kv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.norm, r.norm, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["B2-T37-C8-norm", "B1-T37-C8-raw-init"])
def test_gradients_equal_naive(name):
    grads = []
    for chunked in (True, False):
        tensors, kw, C = make(CASES[name], requires_grad=True)
        q, k, v, kv0, z0 = tensors
        if chunked:
            out, s = causal_linear_attention(q, k, v, LinearAttentionState(kv0, z0), chunk_size=C, **kw)
        else:
            out, s = naive_causal_linear_attention(q, k, v, LinearAttentionState(kv0, z0), **kw)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        loss = (out * w).sum() + s.kv.sin().sum() + (0.1 * s.norm).cos().sum()
        grads.append(torch.autograd.grad(loss, tensors))
    for name, a, b in zip("q k v kv0 z0".split(), *grads):
        assert a.abs().amax() > 0, name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("cuts", [[1], [8, 9, 30], list(range(1, 37))], ids=["1", "ragged", "one-token-steps"])
def test_any_split_with_state_equals_one_call(cuts):
    (q, k, v, kv0, z0), kw, C = make(CASES["B2-T37-C8-norm"])
    full, s_full = causal_linear_attention(q, k, v, chunk_size=C, **kw)
    outs, s = [], None
    for a, b in zip([0, *cuts], [*cuts, 37]):
        o, s = causal_linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], s, chunk_size=C, **kw)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.kv, s_full.kv, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_give_bf16_outputs_and_fp32_state():
    (q, k, v, _, _), kw, C = make(CASES["B2-T37-C8-norm"])
    out, s = causal_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), chunk_size=C)
    assert out.dtype == torch.bfloat16 and s.kv.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_input():
    q = torch.randn(1, 1, 4, 3)
    with pytest.raises(NewLLMError, match="q has 3 tokens, k has 4"):
        causal_linear_attention(q[:, :, :3], q, q)
    with pytest.raises(NewLLMError, match="chunk_size"):
        causal_linear_attention(q, q, q, chunk_size=0)
