"""WindowMemoryLayer (softmax over the last W tokens + a linear-attention memory of older ones):
initialised from a LlamaLayer it IS that layer when the window covers the sequence, and that layer
restricted to the window when the memory is off; the memory terms are the LoLCATs combination."""
from __future__ import annotations

import torch

from newllm import create_model
from newllm.retrofit import memory_from_attention, with_layer_options

TINY = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            num_hidden_layers=2)


def llama():
    torch.manual_seed(0)
    model = create_model("llama", **TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def ids_(T=40):
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))


def test_a_window_over_the_whole_sequence_is_the_original_layer():
    model = llama()
    out = memory_from_attention(model, [0, 1], kind="window_memory", window=64)
    with torch.no_grad():
        torch.testing.assert_close(out(ids_()).logits, model(ids_()).logits, atol=1e-5, rtol=0)


def test_memory_off_is_the_original_restricted_to_the_window():
    model = llama()
    out = memory_from_attention(model, [0], kind="window_memory", window=6)
    windowed = with_layer_options(model, {0: {"sliding_window": 6}})
    out.layers[0].memory_enabled = False
    with torch.no_grad():
        torch.testing.assert_close(out(ids_()).logits, windowed(ids_()).logits, atol=1e-5, rtol=0)
        out.layers[0].memory_enabled = True
        on = out(ids_()).logits
    torch.testing.assert_close(on[:, :6], windowed(ids_()).logits[:, :6], atol=1e-5, rtol=0)  # nothing old yet
    assert (on[:, 6:] - windowed(ids_()).logits[:, 6:]).abs().max() > 1e-4  # the memory reads what left


def test_memory_terms_are_the_lolcats_combination():
    model = llama()
    layer = memory_from_attention(model, [0], kind="window_memory", window=5, feature_map="elu").layers[0]
    mixer = layer.mixer
    x = torch.randn(1, 17, 32)
    with torch.no_grad():
        y, _ = mixer(x)
        q, k, v = mixer.project(x)
        q, k, v = (t.view(1, 17, -1, 8).transpose(1, 2) for t in (q, k, v))
        from newllm.models.ops.rope import apply_rope, rope_cos_sin

        cos, sin = rope_cos_sin(mixer.inv_freq, torch.arange(17), q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        i, j = torch.arange(17)[:, None], torch.arange(17)[None, :]
        win, old = (j <= i) & (i - j < 5), i - j >= 5
        s = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~win, float("-inf"))
        w = torch.sigmoid(mixer.window_factor).view(1, -1, 1, 1)
        a = w * torch.exp(s - s.amax(-1, keepdim=True))
        fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        b = (fq @ fk.transpose(-1, -2)) * old
        ref = ((a + b) @ v) / ((a + b).sum(-1, keepdim=True) + 1e-12)
        torch.testing.assert_close(y, mixer.output(ref.transpose(1, 2).reshape(1, 17, 32)), atol=1e-5, rtol=0)


def test_with_sinks_memory_off_is_the_original_with_window_and_sinks():
    model = llama()
    out = memory_from_attention(model, [0], kind="window_memory", window=6, attention_sinks=2)
    ref = with_layer_options(model, {0: {"sliding_window": 6, "attention_sinks": 2}})
    out.layers[0].memory_enabled = False
    with torch.no_grad():
        torch.testing.assert_close(out(ids_()).logits, ref(ids_()).logits, atol=1e-5, rtol=0)
        state = out(ids_()).state[0]
    assert state.k.shape[2] == 2 + 5  # the sinks and the window's last W - 1
    out.layers[0].memory_enabled = True
    with torch.no_grad():  # with the memory on, the sinks are not in it: the output differs from no sinks
        no_sinks = memory_from_attention(model, [0], kind="window_memory", window=6)
        assert (out(ids_()).logits[:, 8:] - no_sinks(ids_()).logits[:, 8:]).abs().max() > 1e-4


def test_a_nonfinite_memory_write_is_skipped_warned_and_counted():
    import pytest

    from newllm.models.layers import WindowMemoryLayer

    torch.manual_seed(0)
    layer = WindowMemoryLayer(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                              window=4).eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        _, clean = layer.mixer(x)
        x[1, 2, 5] = float("nan")  # row 1's token 2 leaves the window inside this call: its write is NaN
        with pytest.warns(UserWarning, match=r"non-finite memory update in batch rows \[1\] skipped"):
            _, s = layer.mixer(x)
    assert int(s.skipped) == 1 and int(clean.skipped) == 0
    torch.testing.assert_close(s.kv[0], clean.kv[0], atol=0, rtol=0)  # row 0 wrote as before
    assert torch.isfinite(s.kv).all() and torch.equal(s.kv[1], torch.zeros_like(s.kv[1]))  # row 1 kept its memory
