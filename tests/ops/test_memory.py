"""memory_scan (chunkwise over segments) == naive_memory_scan (per-token loop): outputs, final state,
gradients (including w.r.t. the initial state); banks; partial segments; guards."""
from __future__ import annotations

import pytest
import torch

from newllm import NewLLMError
from newllm.models.ops.memory import MemoryState, init_memory, memory_read, memory_scan, phi
from newllm.models.ops.naive import naive_memory_scan

# id: (B, H, T, Tq, Dk, Dv, S, delta_rule, banks, segments_per_bank, write_partial, random initial state)
CASES = {
    "B2-T37-S8-delta": (2, 2, 37, 37, 6, 5, 8, True, 1, 1, True, False),
    "B1-T37-S8-linear": (1, 2, 37, 37, 6, 5, 8, False, 1, 1, True, False),
    "B3-T20-S7-delta-init": (3, 1, 20, 20, 4, 4, 7, True, 1, 1, True, True),
    "B2-T41-S5-banks3x2-init": (2, 2, 41, 41, 6, 6, 5, True, 3, 2, True, True),
    "B2-T23-S6-offset9-nopartial": (2, 1, 23, 14, 5, 3, 6, True, 2, 1, False, True),
    "B1-T5-S8-short-init": (1, 1, 5, 5, 4, 4, 8, True, 1, 1, True, True),
    "B2-T16-S4-exact-linear-banks": (2, 1, 16, 16, 4, 4, 4, False, 2, 1, False, True),
}


def make(case, seed=0, requires_grad=False):
    B, H, T, Tq, Dk, Dv, S, delta, banks, spb, partial, init = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, Dk, generator=g) * 2
    k = torch.randn(B, H, T, Dk, generator=g) * 2
    v = torch.randn(B, H, T, Dv, generator=g)
    state = init_memory(B, H, Dk, Dv, banks=banks)
    if init:
        fk = phi(torch.randn(B, banks, H, 9, Dk, generator=g), 1.0)
        state = MemoryState(fk.transpose(-1, -2) @ torch.randn(B, banks, H, 9, Dv, generator=g), fk.sum(-2),
                            torch.tensor(3), torch.tensor(0))
    tensors = [q, k, v, state.memory, state.norm]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    kw = dict(segment_length=S, segments_per_bank=spb, delta_rule=delta, write_partial=partial)
    return tensors, state, kw


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_scan_equals_naive(case):
    (q, k, v, _, _), state, kw = make(case)
    out, new = memory_scan(q, k, v, state, **kw)
    ref, ref_state = naive_memory_scan(q, k, v, state, **kw)
    assert out.shape == q.shape[:3] + (v.shape[-1],)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.memory, ref_state.memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.norm, ref_state.norm, atol=1e-5, rtol=1e-5)
    assert int(new.segments) == int(ref_state.segments) and int(new.skipped) == 0
    assert (out.abs().amax() > 0.1) and (new.memory - state.memory).abs().amax() > 0.1  # not trivially zero


# From a random initial state: around an empty memory d(read)/dM is ~1/eps, which only measures eps.
@pytest.mark.parametrize("case", [CASES["B3-T20-S7-delta-init"], CASES["B2-T41-S5-banks3x2-init"],
                                  CASES["B2-T23-S6-offset9-nopartial"], CASES["B2-T16-S4-exact-linear-banks"]],
                         ids=["delta", "banks", "offset", "linear"])
def test_scan_gradients_equal_naive(case):
    grads = []
    for fn in (memory_scan, naive_memory_scan):
        tensors, state, kw = make(case, requires_grad=True)
        q, k, v, m0, z0 = tensors
        out, new = fn(q, k, v, MemoryState(m0, z0, state.segments, state.skipped), **kw)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
        loss = (out * w).sum() + new.memory.sin().sum() + (new.norm * 0.1).cos().sum()
        grads.append(torch.autograd.grad(loss, tensors))
    for name, a, b in zip("q k v memory0 norm0".split(), *grads):
        assert a.abs().amax() > 0, name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_scan_in_segment_aligned_pieces_equals_one_call():
    (q, k, v, _, _), state, kw = make(CASES["B2-T41-S5-banks3x2-init"])
    out, full = memory_scan(q, k, v, state, **kw)
    outs, s = [], state
    for a, b in ((0, 10), (10, 15), (15, 41)):
        o, s = memory_scan(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], s, **kw)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.memory, full.memory, atol=1e-5, rtol=1e-5)
    assert int(s.segments) == int(full.segments) == 3 + 9


def test_batch1_state_broadcasts():
    (q, k, v, _, _), state, kw = make(CASES["B3-T20-S7-delta-init"])
    one = MemoryState(state.memory[:1], state.norm[:1], state.segments, state.skipped)
    out, _ = memory_scan(q, k, v, one, **kw)
    for b in range(3):
        ref, _ = memory_scan(q[b:b + 1], k[b:b + 1], v[b:b + 1], one, **kw)
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-6, rtol=0)


def test_empty_memory_reads_zero_and_first_segment_sees_nothing():
    q = torch.randn(1, 1, 3, 4)
    assert torch.equal(memory_read(phi(q, 0.5), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4), 1e-6),
                       torch.zeros(1, 1, 3, 4))
    out, _ = memory_scan(q, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), segment_length=8)
    assert torch.equal(out, torch.zeros(1, 1, 3, 4))


def test_write_partial_false_leaves_tail_unwritten():
    (q, k, v, _, _), state, kw = make(CASES["B1-T37-S8-linear"])
    _, a = memory_scan(q, k, v, **{**kw, "write_partial": False})
    _, b = memory_scan(q[:, :, :32], k[:, :, :32], v[:, :, :32], **kw)
    assert int(a.segments) == 4
    torch.testing.assert_close(a.memory, b.memory, atol=0, rtol=0)


def test_clamp_bounds_each_update():
    (q, k, v, _, _), state, kw = make(CASES["B2-T37-S8-delta"])
    kw["delta_rule"] = False
    _, s = memory_scan(q[:, :, :8], k[:, :, :8], v[:, :, :8], **kw, clamp=0.25)
    _, free = memory_scan(q[:, :, :8], k[:, :, :8], v[:, :, :8], **kw)
    assert s.memory.abs().amax() <= 0.25 and free.memory.abs().amax() > 1.0
    out, s = memory_scan(q, k, v, **kw, clamp=0.25)
    ref, r = naive_memory_scan(q, k, v, **kw, clamp=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.memory, r.memory, atol=1e-5, rtol=1e-5)


def test_nonfinite_update_is_skipped_warned_and_counted():
    (q, k, v, _, _), state, kw = make(CASES["B2-T37-S8-delta"])
    bad = k.clone()
    bad[1, 0, 10] = float("nan")  # batch row 1, segment 1 (tokens 8..15)
    with pytest.warns(UserWarning, match=r"non-finite memory update in batch rows \[1\]"):
        out, s = memory_scan(q, bad, v, **kw)
    assert int(s.skipped) == 1 and torch.isfinite(s.memory).all() and torch.isfinite(s.norm).all()
    clean, c = memory_scan(q, k, v, **kw)
    torch.testing.assert_close(s.memory[0], c.memory[0], atol=0, rtol=0)  # row 0 untouched by row 1's NaN
    # row 1 equals a run in which segment 1 was never written
    drop = torch.cat((k[1:2, :, :8], k[1:2, :, 16:]), 2), torch.cat((v[1:2, :, :8], v[1:2, :, 16:]), 2)
    _, ref = memory_scan(q[1:2, :, :29], *drop, **kw)
    torch.testing.assert_close(s.memory[1:2], ref.memory, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out[:, :, 16:]).all()  # reads after the bad segment stay finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_accumulate_in_fp32(dtype):
    (q, k, v, _, _), state, kw = make(CASES["B2-T37-S8-delta"])
    out, s = memory_scan(q.to(dtype) * 50, k.to(dtype) * 50, v.to(dtype) * 200, **kw)
    ref, r = memory_scan((q.to(dtype) * 50).float(), (k.to(dtype) * 50).float(), (v.to(dtype) * 200).float(), **kw)
    assert out.dtype == dtype and s.memory.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(s.memory).all()
    torch.testing.assert_close(out.float(), ref, atol=1e-2 * 200, rtol=1e-2)


def test_bad_shapes_are_one_line_errors():
    q = torch.randn(1, 2, 4, 3)
    with pytest.raises(NewLLMError, match="q, k, v must be"):
        memory_scan(q[0], q[0], q[0], segment_length=2)
    with pytest.raises(NewLLMError, match="shapes disagree"):
        memory_scan(q, q, torch.randn(1, 2, 5, 3), segment_length=2)
    with pytest.raises(NewLLMError, match="does not fit"):
        memory_scan(q, q, q, init_memory(1, 3, 3, 3), segment_length=2)
    with pytest.raises(NewLLMError, match="segment_length"):
        memory_scan(q, q, q, segment_length=0)
