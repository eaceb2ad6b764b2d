"""context_pythia (ContextLM): x_t = embed(ids_t) + W_c h_{t-1}, h = final-norm output.

The exact model is checked against an independent reference that recomputes every prefix in
parallel without any cache (O(T^2), tiny sizes): logits, and gradients through the recurrence.
"""
from __future__ import annotations

import pytest
import torch

from newllm import NewLLMError, create_model
from newllm.models.context import ContextLM, FeedbackState, shift_context

TINY = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)
T = 11


def tiny(**kw) -> ContextLM:
    torch.manual_seed(0)
    return create_model("context_pythia", **{**TINY, **kw})


def ids_(B=2, n=T, seed=1):
    return torch.randint(0, 97, (B, n), generator=torch.Generator().manual_seed(seed))


def reference_logits(model: ContextLM, ids: torch.Tensor) -> torch.Tensor:
    """h_t from a cache-free parallel pass over the prefix 0..t whose contexts are the h already known."""
    B, n = ids.shape
    hs = []
    for t in range(n):
        prev = torch.stack(hs, 1) if hs else ids.new_zeros(B, 0, 32, dtype=torch.float32)
        ctx = torch.cat((model.initial_context(B)[:, None], prev), 1)  # (B, t+1, d): h_{-1}, h_0..h_{t-1}
        x = model.embed(ids[:, : t + 1]) + model.context_proj(ctx)
        for layer in model.layers:
            x, _ = layer(x, None)
        hs.append(model.norm(x)[:, -1])
    return model.lm_head(torch.stack(hs, 1))


def test_preset_builds_context_model():
    model = tiny()
    assert isinstance(model, ContextLM) and model.config.context_feedback == {"init": "learned"}
    assert model.h_init.requires_grad and model.context_proj.weight.shape == (32, 32)


@pytest.mark.parametrize("init", ["learned", "zero"])
def test_exact_recurrence_equals_cache_free_reference(init):
    model = tiny(context_feedback={"init": init})
    ids = ids_()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits(model, ids), atol=1e-5, rtol=0)
    if init == "zero":
        assert not any(n == "h_init" for n, _ in model.named_parameters()) and model.h_init.abs().max() == 0


def test_update_memory_token_by_token_equals_one_call():
    model = tiny()
    ids = ids_(B=1, n=15)
    with torch.no_grad():
        full = model(ids).logits
        model.reset_memory()
        steps = [model(ids[:, t:t + 1], update_memory=True).logits for t in range(15)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        held = model.get_memory_state()
        assert held.layer_types == ["pythia", "pythia", "model"] and held.entries[-1].state_type == "FeedbackState"
        assert held.entries[-1].tensors[0].shape == (1, 32)


def test_memory_state_file_round_trip(tmp_path):
    """The held state (KV caches + h_{t-1}) saved and loaded continues exactly like one call."""
    from newllm.models.state import load_memory_state, save_memory_state

    model = tiny()
    ids = ids_(B=1, n=12)
    with torch.no_grad():
        full = model(ids).logits
        model.reset_memory()
        model(ids[:, :7], update_memory=True)
        save_memory_state(model.get_memory_state(), tmp_path / "mem.safetensors")
        model.reset_memory()
        model.set_memory_state(load_memory_state(tmp_path / "mem.safetensors"))
        assert isinstance(model._memory[-1], FeedbackState)
        torch.testing.assert_close(model(ids[:, 7:]).logits, full[:, 7:], atol=1e-5, rtol=0)


def test_feedback_changes_the_output():
    model = tiny()
    ids = ids_()
    with torch.no_grad():
        base = model(ids).logits
        model.context_proj.weight.zero_()
        plain = model(ids).logits
    assert (base - plain).abs().max() > 1e-3


def test_lagged_pass_with_exact_context_equals_exact_model():
    model = tiny()
    ids = ids_()
    with torch.no_grad():
        h, _, _ = model.run_recurrence(ids)
        out, h_new = model.forward_lagged(ids, shift_context(h, model.initial_context(2)))
        torch.testing.assert_close(out.logits, model(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(h_new, h, atol=1e-5, rtol=0)


def test_gradients_flow_through_the_recurrence():
    model = tiny()
    ids = ids_(B=1, n=8)
    params = [model.context_proj.weight, model.h_init, model.embed.weight]
    loss = model(ids, labels=ids).loss
    got = torch.autograd.grad(loss, params)
    logits = reference_logits(model, ids)
    ref_loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    want = torch.autograd.grad(ref_loss, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    # truncating every token cuts the paths through h: the gradient of h_init changes
    cut = torch.autograd.grad(model.recurrent_loss(ids, ids, detach_every=1), model.h_init)[0]
    assert (cut - got[1]).abs().max() > 1e-6
    same = torch.autograd.grad(model.recurrent_loss(ids, ids, detach_every=8), model.h_init)[0]
    torch.testing.assert_close(same, got[1], atol=1e-6, rtol=0)


def test_jacobi_sweeps_fix_one_more_position_each():
    model = tiny()
    ids = ids_()
    with torch.no_grad():
        exact = model.run_recurrence(ids)[0]
        for j in (1, 4):
            h = model.jacobi_hidden(ids, None, j)
            torch.testing.assert_close(h[:, :j], exact[:, :j], atol=1e-5, rtol=0)
            assert (h[:, j:] - exact[:, j:]).abs().max() > 1e-4  # not yet converged beyond
        torch.testing.assert_close(model.jacobi_hidden(ids, None, T), exact, atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path):
    from newllm.checkpoints.native import load_model, save_model

    model = tiny()
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert isinstance(back, ContextLM)
    ids = ids_()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_bad_inputs_are_one_line_errors():
    model = tiny()
    ids = ids_()
    with pytest.raises(NewLLMError, match="context has shape") as e:
        model.forward_lagged(ids, torch.zeros(2, T - 1, 32))
    assert "\n" not in str(e.value)
    plain_state = create_model("pythia", **TINY)(ids).state
    with pytest.raises(NewLLMError, match="FeedbackState"):
        model(ids, state=plain_state)
    with pytest.raises(NewLLMError, match="init must be one of"):
        tiny(context_feedback={"init": "random"})
    with pytest.raises(NewLLMError, match=r"unknown key\(s\) \['inti'\]"):
        tiny(context_feedback={"inti": "zero"})
    with pytest.raises(NewLLMError, match="detach_every must be > 0"):
        model.recurrent_loss(ids, ids, detach_every=0)


def test_generate_uses_the_recurrence():
    model = tiny()
    ids = ids_(B=2, n=4)
    out = model.generate(ids, max_new_tokens=5)
    ref = ids
    with torch.no_grad():
        for _ in range(5):
            ref = torch.cat((ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ref)


def test_forward_signature_is_the_transformer_lms():
    import inspect

    from newllm.models.model import TransformerLM

    def names(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]

    assert names(ContextLM.forward) == names(TransformerLM.forward)
    model = tiny()
    ids = ids_()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, model(ids).logits[:, -3:], atol=1e-6, rtol=0)
