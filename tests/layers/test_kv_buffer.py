"""The preallocated KV cache (issue 16): decoding appends in place, a state stays what it was."""
from __future__ import annotations

import torch

from newllm import create_model


def tiny(preset="llama", **extra):
    torch.manual_seed(0)
    return create_model(preset, vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, num_hidden_layers=2, **extra).eval() if preset == "llama" else \
        create_model(preset, vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     num_hidden_layers=2, **extra).eval()


def test_decoding_appends_in_place_and_equals_one_call():
    model = tiny()
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        res = model(ids[:, :8])
        state, steps, ptrs = res.state, [res.logits], set()
        for t in range(8, 40):
            res = model(ids[:, t:t + 1], state=state)
            state = res.state
            steps.append(res.logits)
            ptrs.add(state[0].k.untyped_storage().data_ptr())
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    # 32 decoded tokens: the cache moved buffers only when its spare room ran out (8 + 1 -> 41 keys
    # with half as much again, at least 32, spare: one buffer), not once per token
    assert len(ptrs) == 1


def test_a_state_extended_twice_keeps_both_branches_right():
    model = tiny()
    ids = torch.randint(0, 64, (1, 12))
    a, b = torch.tensor([[5]]), torch.tensor([[9]])
    with torch.no_grad():
        s0 = model(ids[:, :10]).state
        s1 = model(ids[:, 10:11], state=s0).state  # moved into a buffer with room
        k_before = s1[0].k.clone()
        out_a = model(a, state=s1)  # written in place after s1
        out_b = model(b, state=s1)  # s1's end is taken: a fresh buffer, out_a untouched
        again_a = model(torch.tensor([[7]]), state=out_a.state).logits
        ref_b = model(torch.cat((ids[:, :11], b), 1)).logits[:, -1:]
        ref_a = model(torch.cat((ids[:, :11], a, torch.tensor([[7]])), 1)).logits[:, -1:]
    assert torch.equal(s1[0].k, k_before)
    assert torch.allclose(out_b.logits, ref_b, atol=1e-5, rtol=0)
    assert torch.allclose(again_a, ref_a, atol=1e-5, rtol=0)
    assert s1[0].k.untyped_storage().data_ptr() == out_a.state[0].k.untyped_storage().data_ptr()
    assert out_b.state[0].k.untyped_storage().data_ptr() != out_a.state[0].k.untyped_storage().data_ptr()


def test_windowed_cache_stays_bounded_and_exact():
    model = tiny("pythia", sliding_window=6)
    ids = torch.randint(0, 64, (1, 120))
    with torch.no_grad():
        full = model(ids).logits
        state, steps, sizes = None, [], set()
        for t in range(120):
            res = model(ids[:, t:t + 1], state=state)
            state = res.state
            steps.append(res.logits)
            sizes.add(state[0].k.untyped_storage().nbytes())
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert state[0].k.shape[-2] == 5 and max(sizes) <= 4 * (5 + 1 + 32) * 8 * 4  # B hkv Dh fp32: bounded buffers


def test_under_autograd_the_cache_is_concatenated_and_gradients_flow():
    model = tiny().train()
    ids = torch.randint(0, 64, (1, 16))
    s = model(ids[:, :8]).state
    out = model(ids[:, 8:], state=s, labels=ids[:, 8:])
    out.loss.backward()  # an in-place write into s's buffer would fail here (a modified saved view)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_windowed_streaming_keeps_one_buffer_once_the_window_is_full():
    """With a window, a full buffer's kept keys move to its front (nothing else views it): chunks of 5
    with a window of 8 run in one buffer from the moment the window is full, exactly (before this,
    a full buffer moved into a new one, and the old and new were held at once)."""
    model = tiny("pythia", sliding_window=8)
    ids = torch.randint(0, 64, (1, 200))
    with torch.no_grad():
        full = model(ids).logits
        state, steps, ptrs = None, [], []
        for t in range(0, 200, 5):
            res = model(ids[:, t:t + 5], state=state)
            state = res.state
            steps.append(res.logits)
            ptrs.append(state[0].k.untyped_storage().data_ptr())
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert len(set(ptrs[3:])) == 1  # 40 calls, one buffer after the first few
    # at most max(2 (keep + T), keep + T + 32) keys (the spare is at least 32 keys); 4 heads x Dh 8 fp32
    keys = state[0].k.untyped_storage().nbytes() // (4 * 8 * 4)
    assert keys <= max(2 * (7 + 5), 7 + 5 + 32)


def test_a_held_windowed_state_is_never_written_by_the_front_move():
    """A state someone still holds views the buffer, so the front move is refused (a fresh buffer):
    the held state keeps its values, and continuing from it later is still exact."""
    model = tiny("pythia", sliding_window=8)
    ids = torch.randint(0, 64, (1, 120))
    with torch.no_grad():
        state = None
        for t in range(0, 40, 5):
            state = model(ids[:, t:t + 5], state=state).state
        held, held_k = state, state[0].k.clone()
        for t in range(40, 120, 5):
            state = model(ids[:, t:t + 5], state=state).state
        again = model(ids[:, 40:45], state=held).logits
        ref = model(ids[:, :45]).logits[:, 40:]
    assert torch.equal(held[0].k, held_k)
    assert torch.allclose(again, ref, atol=1e-5, rtol=0)
