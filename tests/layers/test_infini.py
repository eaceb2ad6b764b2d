"""InfiniLayer: one call == any split (inside segments, 1-token steps) for both local-attention kinds,
banks and both write rules; what the memory contributes; gradients into the state; config and state
errors; fp16 streaming over 1M tokens stays finite."""
from __future__ import annotations

import random

import pytest
import torch

from newllm import NewLLMError
from newllm.models.layers import InfiniLayer, InfiniLayerConfig, InfiniState, build_layer

SIZES = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)
CONFIGS = {
    "softmax-delta": dict(segment_length=8),
    "linear-delta": dict(segment_length=8, local_attention="linear", linear_chunk_size=3),
    "softmax-linearrule-banks": dict(segment_length=6, use_delta_rule=False, num_memory_banks=3, segments_per_bank=2),
    "linear-banks-memheads": dict(segment_length=5, local_attention="linear", num_memory_banks=2,
                                  segments_per_bank=1, memory_head_dim=16),
    "softmax-sequential-residual": dict(segment_length=7, use_parallel_residual=False, gate_init=1.5),
}
T = 45


def random_cuts(seed: int, n: int):
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, T), n))


SPLITS = {
    "inside-segments": [3, 11, 12, 29],  # none on a segment boundary of S = 8
    "random-a": random_cuts(0, 6),
    "random-b": random_cuts(1, 12),
    "one-token-steps": list(range(1, T)),
}


def make_layer(**options) -> InfiniLayer:
    torch.manual_seed(0)
    layer = InfiniLayer(**SIZES, **options).eval()
    with torch.no_grad():  # larger weights than the init so that the memory read is far from uniform
        layer.mixer.query_key_value.weight.mul_(20)
    return layer


def run_pieces(layer, x, cuts, state=None):
    outs = []
    for a, b in zip([0, *cuts], [*cuts, x.shape[1]]):
        y, state = layer(x[:, a:b], state)
        outs.append(y)
    return torch.cat(outs, 1), state


def data(B=2, seed=1):
    return torch.randn(B, T, SIZES["hidden_size"], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_one_call_equals_any_split(options, split):
    layer, x = make_layer(**options), data()
    with torch.no_grad():
        full, s_full = layer(x)
        pieces, s = run_pieces(layer, x, split)
    torch.testing.assert_close(pieces, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.memory, s_full.memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.segment_k, s_full.segment_k, atol=1e-6, rtol=0)
    S = options["segment_length"]
    assert int(s.segments) == T // S and s.segment_k.shape == (2, T % S, 32)
    assert layer.tokens_absorbed(s) == T


@pytest.mark.parametrize("options", [CONFIGS["softmax-delta"], CONFIGS["linear-banks-memheads"]],
                         ids=["softmax-delta", "linear-banks"])
def test_memory_changes_outputs_only_after_the_first_segment(options):
    layer, x = make_layer(**options), data()
    off = make_layer(**options, use_memory=False)
    S = options["segment_length"]
    with torch.no_grad():
        y_on, s_on = layer(x)
        y_off, s_off = off(x)
    # segment 0 reads an empty memory: identical; later segments read what segment 0.. wrote
    torch.testing.assert_close(y_on[:, :S], y_off[:, :S], atol=1e-6, rtol=0)
    assert (y_on[:, S:] - y_off[:, S:]).abs().amax(-1).min() > 1e-3
    assert s_on.memory.abs().amax() > 0 and s_off.memory.abs().amax() == 0 and int(s_off.segments) == 0


def test_banks_are_written_in_turn():
    layer, x = make_layer(**CONFIGS["softmax-linearrule-banks"]), data()  # S = 6, 3 banks x 2 segments
    with torch.no_grad():
        _, s = layer(x[:, :12])  # segments 0, 1 -> bank 0
        assert s.memory[:, 0].abs().amax() > 0 and s.memory[:, 1:].abs().amax() == 0
        _, s = layer(x[:, 12:42], s)  # segments 2, 3 -> bank 1; 4, 5 -> bank 2; 6 (partial) unwritten
        assert s.memory[:, 1:].abs().flatten(2).amax(-1).min() > 0 and s.segment_k.shape[1] == 0
        assert int(s.segments) == 7 and layer.tokens_absorbed(s) == 42


def test_gradients_equal_for_one_call_and_pieces_and_reach_the_initial_state():
    layer, x = make_layer(**CONFIGS["softmax-delta"]), data()
    layer.train()
    with torch.no_grad():
        _, s0 = layer(x[:, :13])
    grads = []
    for cuts in ([], [5, 6, 20]):
        layer.zero_grad()
        init = InfiniState(s0.memory.clone().requires_grad_(True), s0.norm.clone().requires_grad_(True),
                           *s0[2:])
        y, s = run_pieces(layer, x[:, 13:], cuts, init)
        (y.square().mean() + s.memory.mean()).backward()
        grads.append([layer.mixer.query_key_value.weight.grad.clone(), layer.mixer.beta.grad.clone(), init.memory.grad,
                      init.norm.grad])
    for a, b in zip(*grads):
        assert a.abs().amax() > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_constructor_forms_gate_and_spec():
    a = InfiniLayer(512, 8, 2048)
    b = InfiniLayer(hidden_size=512, num_heads=8, intermediate_size=2048)
    assert a.config == b.config == InfiniLayerConfig()
    assert a.config.memory_dim == 512 and a.config.memory_heads == 1 and a.has_compressive_memory
    assert torch.equal(a.gates()['memory'], torch.full((8,), 0.5))
    assert a.param_groups() == {"gates": [a.mixer.beta]}
    layer, x = make_layer(**CONFIGS["linear-delta"]), data()
    rebuilt = build_layer(layer.spec())
    rebuilt.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], layer(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("options,match", [
    (dict(memory_head_dim=12), "not divisible by memory_head_dim 12"),
    (dict(local_attention="flash"), "local_attention must be one of"),
    (dict(segment_length=0), "segment_length must be > 0"),
    (dict(memory_update_clamp=-1.0), "memory_update_clamp must be > 0"),
    (dict(segments_per_bnk=2), r"unknown key\(s\) \['segments_per_bnk'\]"),
])
def test_bad_config(options, match):
    with pytest.raises(NewLLMError, match=match):
        InfiniLayer(**SIZES, **options)


def test_bad_state_is_one_line_error():
    layer, x = make_layer(segment_length=8), data()
    with torch.no_grad():
        _, s = layer(x[:, :5])
        with pytest.raises(NewLLMError, match=r"state segment_k \(2, 5, 32\) / segment_v \(2, 6, 32\)"):
            layer(x, s._replace(segment_v=torch.zeros(2, 6, 32)))
        with pytest.raises(NewLLMError, match="tensor 'memory' has shape .* needs size 2 in dim 2"):
            make_layer(segment_length=8, memory_head_dim=16)(x, s)


def test_nan_in_one_row_is_skipped_and_counted():
    layer, x = make_layer(segment_length=8), data()
    bad = x.clone()
    bad[1, 3] = float("nan")
    with torch.no_grad(), pytest.warns(UserWarning, match="non-finite memory update"):
        _, s = layer(bad)
    assert int(s.skipped) == 1 and torch.isfinite(s.memory).all()


@pytest.mark.slow
@pytest.mark.parametrize("rule", [True, False], ids=["delta", "linear-rule"])
def test_fp16_stream_of_1M_tokens_stays_finite(rule):
    """fp16 activations (CPU fp16 matmuls exist in this torch), fp32 memory: 2**20 tokens in 16 calls."""
    torch.manual_seed(0)
    layer = InfiniLayer(16, 2, 32, segment_length=1024, local_attention="linear", use_delta_rule=rule)
    layer = layer.half().eval()
    state, g = None, torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(16):
            x = torch.randn(1, 2**16, 16, generator=g).half() * 4
            y, state = layer(x, state)
            assert torch.isfinite(y).all() and y.abs().amax() <= 65504
    assert layer.tokens_absorbed(state) == 2**20 and int(state.skipped) == 0
    assert torch.isfinite(state.memory).all() and torch.isfinite(state.norm).all()
    assert state.norm.amax() > 65504  # z outgrew fp16's range: the reason the memory is kept in fp32
