"""The attention window isolates: past `model.receptive_field` a token reaches the logits only through a memory.

A stack of L softmax layers with a window of W keys reaches L x (W - 1) tokens back through depth;
a memory layer's local attention reaches S - 1 (its segment). So with the memory switched off,
changing a token more than `receptive_field` positions back leaves the logits unchanged (to 1e-5,
fp32), while with the memory on it changes them: the memory is the only route.
"""
from __future__ import annotations

import pytest
import torch

from newllm import create_model
from newllm.eval.ablation import memory_switched_off

V = 97
TINY = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3)
T = 48


def logits_at(model, ids, t):
    with torch.no_grad():
        return model(ids).logits[0, t]


def changed(ids, pos):
    other = ids.clone()
    other[0, pos] = (other[0, pos] + 1) % V
    return other


def ids_():
    return torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("window", [2, 4, 7])
def test_window_receptive_field_is_exact(window):
    torch.manual_seed(0)
    model = create_model("pythia", **TINY, sliding_window=window).eval()
    rf = model.receptive_field
    assert rf == 3 * (window - 1)
    ids, t = ids_(), T - 1
    base = logits_at(model, ids, t)
    torch.testing.assert_close(logits_at(model, changed(ids, t - rf - 1), t), base, atol=1e-5, rtol=0)
    assert (logits_at(model, changed(ids, t - rf), t) - base).abs().max() > 1e-4  # the edge is reached


def test_unbounded_stacks_have_no_receptive_field():
    assert create_model("pythia", **TINY).receptive_field is None  # full attention
    assert create_model("pythia", **TINY, sliding_window=4, attention_sinks=1).receptive_field is None
    assert create_model("context_pythia", **TINY).receptive_field is None  # h_{t-1} feedback


MEMORY = {  # (preset, options): one memory layer under windowed Pythia layers, and memory everywhere
    "infini+window": ("infini", dict(segment_length=4, sliding_window=3)),
    "infini_all": ("infini_all", dict(segment_length=5)),
    "multi_memory_all": ("multi_memory_all", dict(segment_length=4, num_memories=2)),
}


@pytest.mark.parametrize("case", sorted(MEMORY))
def test_beyond_the_receptive_field_only_the_memory_reaches(case):
    name, options = MEMORY[case]
    torch.manual_seed(0)  # weights at 0.5 std: a memory read of a token 40 back moves the logits by > 1e-3
    model = create_model(name, **TINY, **options, initializer_range=0.5).eval()
    rf = model.receptive_field
    S = options["segment_length"]
    W = options.get("sliding_window")
    assert rf == (S - 1) * (1 if W else 3) + (2 * (W - 1) if W else 0)
    ids, t = ids_(), T - 1
    for pos in (t - rf - 1, t - rf - 7, 0):  # every one of them beyond the receptive field
        other = changed(ids, pos)
        with memory_switched_off(model) as n:
            assert n >= 1
            torch.testing.assert_close(logits_at(model, other, t), logits_at(model, ids, t), atol=1e-5, rtol=0)
        assert (logits_at(model, other, t) - logits_at(model, ids, t)).abs().max() > 1e-3, pos
