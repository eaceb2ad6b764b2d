"""HierarchicalLayer: its two levels are exactly an Infini memory (coarse) and MultiMemoryLayer's
memories (fine), the continuous expansion gate interpolates between them, the threshold exists only
for generation, and the layer contract holds."""
from __future__ import annotations

import pytest
import torch

from newllm import NewLLMError, create_model
from newllm.models.layers import HierarchicalLayer, InfiniLayer, MultiMemoryLayer
from newllm.models.layers.hierarchical import expansion_threshold

OPTS = dict(segment_length=5, num_memories=3)


def layer(**kw):
    torch.manual_seed(0)
    return HierarchicalLayer(32, 4, 64, **{**OPTS, **kw}).eval()


def copy_into(dst, src):
    """dst gets every parameter of src that it has (same names and shapes)."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not missing, missing


X = torch.randn(2, 23, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "linear"])
def test_gate_closed_is_infini_and_open_is_multi_memory(delta):
    """e -> 0: the layer is an InfiniLayer (its coarse memory); e -> 1: a MultiMemoryLayer (fine)."""
    h = layer(use_delta_rule=delta)
    infini = InfiniLayer(32, 4, 64, segment_length=5, use_delta_rule=delta).eval()
    multi = MultiMemoryLayer(32, 4, 64, use_delta_rule=delta, **OPTS).eval()
    copy_into(infini, h)
    copy_into(multi, h)
    with torch.no_grad():
        for bias, ref in ((-40.0, infini), (40.0, multi)):
            h.mixer.memory.expansion.bias.fill_(bias)
            y, s = h(X)
            y_ref, s_ref = ref(X)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.memory, s_ref.memory, atol=1e-6, rtol=0)  # fine level == MultiMemory's
        _, s_inf = infini(X)
        torch.testing.assert_close(s.coarse_memory, s_inf.memory[:, 0], atol=1e-6, rtol=0)  # coarse == Infini's
        torch.testing.assert_close(s.coarse_norm, s_inf.norm[:, 0], atol=1e-6, rtol=0)


def test_gate_is_continuous_and_trained():
    """In training the output moves smoothly with the gate and every gate parameter gets a gradient."""
    h = layer().train()
    y, _ = h(X)
    y.pow(2).mean().backward()
    for p in h.param_groups()["gates"]:
        assert p.grad is not None and p.grad.abs().max() > 0
    with torch.no_grad():
        outs = []
        for b in (0.0, 1e-3):
            h.mixer.memory.expansion.bias.fill_(b)
            outs.append(h(X)[0])
    d = (outs[1] - outs[0]).abs().max()
    assert 0 < d < 1e-3  # a tiny gate change makes a tiny (nonzero) output change: no step


def test_threshold_only_for_generation():
    # e = sigmoid(0.3) = 0.574 for every token (the gate's weights start at 0)
    model = create_model("hierarchical", vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         num_hidden_layers=2, expansion_gate_init=0.3, **OPTS)
    with pytest.raises(NewLLMError, match="training mode"):
        with expansion_threshold(model.train(), 0.5):
            pass
    model.eval()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        soft = model(ids).logits
        with expansion_threshold(model, 0.5):
            hard = model(ids).logits
            gen = model.generate(ids, max_new_tokens=3)
        assert model.layers[0].mixer.memory.threshold is None  # switched off on leaving the block
        torch.testing.assert_close(model(ids).logits, soft, atol=0, rtol=0)
    assert gen.shape == (1, 15)
    # 0.574 >= 0.5: the hard gate expands fully, i.e. equals the open gate
    with torch.no_grad():
        model.layers[0].mixer.memory.expansion.bias.fill_(40.0)
        torch.testing.assert_close(hard, model(ids).logits, atol=1e-5, rtol=0)
    assert (hard - soft).abs().max() > 1e-5
    h = layer()
    h.mixer.memory.threshold = 0.5
    with pytest.raises(NewLLMError, match="generation only"):
        h.train()(X)


@pytest.mark.parametrize("cuts", [[3], [1, 2, 9, 10, 17], list(range(1, 23))], ids=["inside-seg", "ragged", "1-token"])
def test_one_call_equals_any_split(cuts):
    h = layer()
    with torch.no_grad():
        h.mixer.memory.expansion.weight.normal_(std=0.5)  # a token-dependent gate
        full, s_full = h(X)
        state, outs = None, []
        for a, b in zip([0, *cuts], [*cuts, 23]):
            y, state = h(X[:, a:b], state)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
    for a, b in zip(state, s_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_preset_options():
    m = create_model("hierarchical", num_memories=4, use_delta_rule=False, vocab_size=97, hidden_size=32,
                     num_attention_heads=4, intermediate_size=64)
    assert [l.layer_type for l in m.layers] == ["hierarchical"] + ["pythia"] * 5
    c = m.layers[0].config
    assert c.num_memories == 4 and not c.use_delta_rule
    s = m.layers[0].init_state(1)
    assert s.memory.shape == (1, 4, 1, 32, 32) and s.coarse_memory.shape == (1, 1, 32, 32)
    assert HierarchicalLayer.has_compressive_memory
    torch.testing.assert_close(m.layers[0].gates()['memory'], torch.full((4,), 0.5))
