"""Surgery on pretrained-shaped models (tiny Llama with GQA, tiny GPT-NeoX): changed layer options
keep the weights; attention layers become memory layers initialised from them (Q/K/V/O copied, GQA
kept, GPT-NeoX's interleaved rows reordered); the alpha-0 parallel adapter is the original exactly."""
from __future__ import annotations

import pytest
import torch

from newllm import NewLLMError, create_model
from newllm.models.layers import InfiniLayer, ParallelAdapter, PythiaLayer
from newllm.retrofit import memory_from_attention, with_layer_options

TINY = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3)


def tiny(name: str):
    torch.manual_seed(0)
    extra = {"num_key_value_heads": 2} if name == "llama" else {}
    model = create_model(name, **TINY, **extra).eval()
    with torch.no_grad():  # pretrained-like: no zero biases, norms away from 1
        for n, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def ids_(T: int = 37):
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["llama", "pythia"])
def test_with_layer_options_keeps_weights_and_applies_the_option(name):
    model = tiny(name)
    windowed = with_layer_options(model, {1: {"sliding_window": 4, "attention_sinks": 1}})
    assert windowed.layers[1].config.sliding_window == 4 and model.layers[1].config.sliding_window is None
    for (n, a), (_, b) in zip(model.state_dict().items(), windowed.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        a, b = model(ids_()).logits, windowed(ids_()).logits
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-6, rtol=0)  # inside the window: the same
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4
    with pytest.raises(NewLLMError, match=r"layer 1 \(\w+\) has no option\(s\) \['sliding_windw'\]"):
        with_layer_options(model, {1: {"sliding_windw": 4}})
    with pytest.raises(NewLLMError, match=r"layer indices \[3\]"):
        with_layer_options(model, {3: {"sliding_window": 4}})


@pytest.mark.parametrize("name", ["llama", "pythia"])
def test_memory_layer_is_initialised_from_the_attention(name):
    model = tiny(name)
    out = memory_from_attention(model, [0], segment_length=8)
    old, new = model.layers[0], out.layers[0]
    assert isinstance(new, InfiniLayer) and new.config.block == ("llama" if name == "llama" else "neox")
    assert new.mixer.kv_heads == old.mixer.kv_heads and new.mixer.heads == old.mixer.heads  # GQA kept
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        q_old, k_old, v_old = (old.mixer if name == "llama" else _no_rope(old.mixer)).qkv(x, 0)
        q, k, v = new.mixer.project(x)
        heads = lambda t: t.view(2, 5, -1, old.mixer.head_dim).transpose(1, 2)  # noqa: E731
        if name == "pythia":  # no rotary in the comparison: the same q, k, v rows, reordered
            torch.testing.assert_close(heads(q), q_old, atol=1e-6, rtol=0)
            torch.testing.assert_close(heads(k), k_old, atol=1e-6, rtol=0)
        torch.testing.assert_close(heads(v), v_old, atol=1e-6, rtol=0)
        for n, p in old.mlp.state_dict().items():
            assert torch.equal(p, new.mlp.state_dict()[n])
        for i in (1, 2):  # the other layers untouched
            for (n, a), (_, b) in zip(model.layers[i].state_dict().items(), out.layers[i].state_dict().items()):
                assert torch.equal(a, b), n
        assert torch.isfinite(out(ids_()).logits).all()


def _no_rope(mixer):
    """The Pythia mixer with rotary switched off, so its q/k can be compared with the NoPE memory's."""
    import copy

    m = copy.deepcopy(mixer)
    m.rotary_ndims = 0
    return m


@pytest.mark.parametrize("name", ["llama", "pythia"])
@pytest.mark.parametrize("kind", ["infini", "multi_memory", "hierarchical"])
def test_alpha0_adapter_is_the_original_bit_for_bit(name, kind):
    model = tiny(name)
    adapted = memory_from_attention(model, [0, 2], kind=kind, adapter=True, alpha_init=0.0, segment_length=8)
    assert all(isinstance(adapted.layers[i], ParallelAdapter) for i in (0, 2))
    ids = ids_(41)
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, model(ids).logits)
        cont = adapted(ids[:, 20:], state=adapted(ids[:, :20]).state).logits  # with the state carried
        assert torch.equal(cont, model(ids[:, 20:], state=model(ids[:, :20]).state).logits)
    # alpha is the only new-branch parameter with a gradient at alpha = 0 (the seed's "alpha is not learned")
    adapted.train()
    adapted(ids, labels=ids).loss.backward()
    a = adapted.layers[0]
    assert a.alpha.grad is not None and a.alpha.grad.abs() > 0
    assert all(p.grad is None or not p.grad.any() for p in a.new.parameters())
    assert a.param_groups()["gates"][0] is a.alpha


def test_adapter_refuses_a_stateless_or_mismatched_layer():
    with pytest.raises(NewLLMError, match="differ in hidden_size"):
        ParallelAdapter(PythiaLayer(32, 4, 64), InfiniLayer(64, 4, 64))
    with pytest.raises(NewLLMError, match="can replace a pythia or llama layer"):
        memory_from_attention(memory_from_attention(tiny("llama"), [0]), [0])


def test_the_new_model_keeps_the_originals_dtype():
    model = tiny("llama").to(torch.bfloat16)
    for adapter in (False, True):
        out = memory_from_attention(model, [1], kind="window_memory", adapter=adapter, window=4)
        assert {p.dtype for p in out.parameters()} == {torch.bfloat16}
        assert torch.equal(out.layers[0].mlp.down_proj.weight, model.layers[0].mlp.down_proj.weight)


def test_random_init_leaves_the_new_layer_at_its_own_init():
    model = tiny("llama")
    torch.manual_seed(5)
    out = memory_from_attention(model, [1], kind="infini", init="random", segment_length=8)
    torch.manual_seed(5)
    again = memory_from_attention(model, [1], kind="infini", init="random", segment_length=8)
    q_old, q_new = model.layers[1].self_attn.q_proj.weight, out.layers[1].self_attn.q_proj.weight
    assert not torch.allclose(q_old, q_new) and torch.equal(q_new, again.layers[1].self_attn.q_proj.weight)
    assert torch.equal(out.layers[0].self_attn.q_proj.weight, model.layers[0].self_attn.q_proj.weight)  # untouched
    with pytest.raises(NewLLMError, match="init must be one of"):
        memory_from_attention(model, [1], init="zeros")


def test_an_adapter_declares_its_new_branchs_memory():
    """A compact memory state keeps the adapter's entry, and the memory-off ablation reaches it."""
    model = tiny("llama")
    out = memory_from_attention(model, [1], kind="infini", adapter=True, alpha_init=0.5, segment_length=4)
    assert out.layers[1].has_compressive_memory and not out.layers[0].has_compressive_memory
    with torch.no_grad():
        out(ids_(12), update_memory=True)
        compact = out.get_memory_state(compact=True)
        on = out(ids_(12)).logits
        out.layers[1].memory_enabled = False
        off = out(ids_(12)).logits
    assert [e.tensors is not None for e in compact.entries] == [False, True, False]
    assert (on - off).abs().max() > 1e-4
