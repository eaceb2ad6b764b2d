"""Attention sinks (StreamingLLM, arXiv 2309.17453) on a sliding window: each query sees its W most
recent keys and the first s tokens; the cache keeps exactly those; errors for a sink without a window."""
from __future__ import annotations

import pytest
import torch

from newllm import NewLLMError
from newllm.models.layers import LlamaLayer, PythiaLayer

W, S, T = 6, 2, 29


@pytest.mark.parametrize("cls", [PythiaLayer, LlamaLayer], ids=["pythia", "llama"])
def test_sinks_equal_the_explicit_mask_and_the_cache_keeps_sinks_and_window(cls):
    torch.manual_seed(0)
    extra = {"num_key_value_heads": 2} if cls is LlamaLayer else {}
    layer = cls(32, 4, 64, sliding_window=W, attention_sinks=S, **extra).eval()
    x = torch.randn(2, T, 32)
    mixer = layer.mixer
    with torch.no_grad():
        out, state = mixer(x)
        q, k, v = mixer.qkv(x, 0)
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        visible = (j <= i) & ((i - j < W) | (j < S))
        scores = (q @ k.transpose(-1, -2)) * mixer.head_dim**-0.5
        ref = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
        torch.testing.assert_close(out, mixer.output(ref.transpose(1, 2).reshape(2, T, -1)), atol=1e-6, rtol=0)
        window_only = cls(32, 4, 64, sliding_window=W, **extra).eval()
        window_only.load_state_dict(layer.state_dict())
        assert (window_only.mixer(x)[0][:, W + S:] - out[:, W + S:]).abs().max() > 1e-3  # the sinks matter
    assert state.k.shape[-2] == S + W - 1 and int(state.pos) == T
    torch.testing.assert_close(state.k[..., :S, :], mixer.qkv(x, 0)[1][..., :S, :])  # the sinks are the first keys


def test_sinks_need_a_window():
    with pytest.raises(NewLLMError, match="attention_sinks must be >= 0 and needs a sliding_window"):
        PythiaLayer(32, 4, 64, attention_sinks=4)
    with pytest.raises(NewLLMError, match="attention_sinks must be >= 0"):
        LlamaLayer(32, 4, 64, sliding_window=8, attention_sinks=-1)
