"""The model shell: the held memory (update_memory, memory_aside, detached), token ids outside the
vocabulary, unknown names, the loss, generation. The layer contract itself (one call == any split,
causality, broadcast, ...) is checked for every registered layer type and preset by
tests/models/test_conformance.py."""
from __future__ import annotations

import pytest
import torch

from newllm import NewLLMError, create_model


def test_memory_shell_matches_explicit_state(tiny_pythia):
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = tiny_pythia(ids).logits
        tiny_pythia.reset_memory()
        a = tiny_pythia(ids[:, :10], update_memory=True).logits
        b = tiny_pythia(ids[:, 10:], update_memory=True).logits
        torch.testing.assert_close(torch.cat((a, b), 1), full, atol=1e-5, rtol=0)
        # without update_memory the held memory is read but not changed
        held = tiny_pythia.get_memory_state().named_tensors()
        tiny_pythia(ids[:, :3])
        after = tiny_pythia.get_memory_state().named_tensors()
        assert held.keys() == after.keys() and all(torch.equal(held[k], after[k]) for k in held)
        tiny_pythia.reset_memory()
        torch.testing.assert_close(tiny_pythia(ids).logits, full, atol=1e-6, rtol=0)


def test_held_memory_is_detached(tiny_pythia):
    ids = torch.randint(0, 97, (1, 8))
    tiny_pythia.train()
    out = tiny_pythia(ids, labels=ids, update_memory=True)
    out.loss.backward()
    out2 = tiny_pythia(ids, labels=ids, update_memory=True)
    out2.loss.backward()  # a graph kept in the memory would fail here (double backward)
    assert all(not t.requires_grad for t in tiny_pythia.get_memory_state().named_tensors().values())


@pytest.mark.parametrize("bad", [97, 500, -1])
def test_token_outside_vocab_is_one_line_error(tiny_pythia, bad):
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[1, 3] = bad
    with pytest.raises(NewLLMError, match=rf"token id {bad} at \(batch, position\) \(1, 3\)") as e:
        tiny_pythia(ids)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_layer_type():
    with pytest.raises(NewLLMError, match="unknown preset or layer type 'pythai'"):
        create_model("pythai")
    from newllm.models.layers import build_layer

    with pytest.raises(NewLLMError, match="unknown layer type 'nope'"):
        build_layer({"type": "nope", "hidden_size": 8})
    with pytest.raises(NewLLMError, match=r"option\(s\) \['hidden_sise'\]"):
        create_model("pythia", hidden_sise=64)


def test_loss_matches_manual_cross_entropy(tiny_pythia):
    ids = torch.randint(0, 97, (2, 12))
    out = tiny_pythia(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=0)


def test_generate_greedy_equals_argmax_loop(tiny_pythia):
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    out = tiny_pythia.generate(ids, max_new_tokens=6)
    ref = ids
    with torch.no_grad():
        for _ in range(6):
            ref = torch.cat((ref, tiny_pythia(ref).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ref)


def test_generate_sampling_is_seeded(tiny_pythia):
    ids = torch.randint(0, 97, (1, 4))
    a = tiny_pythia.generate(ids, 8, do_sample=True, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = tiny_pythia.generate(ids, 8, do_sample=True, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (1, 12)


def test_memory_aside_restores_the_held_memory_and_mode(tiny_pythia):
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(6))
    tiny_pythia.eval()
    tiny_pythia(ids, update_memory=True)
    held = tiny_pythia.get_memory_state().named_tensors()
    with tiny_pythia.memory_aside(train=True) as m:
        assert m.get_memory_state() is None and m.training
        m(ids, update_memory=True)  # absorbs into the set-aside slot, not into the user's memory
    after = tiny_pythia.get_memory_state().named_tensors()
    assert not tiny_pythia.training
    assert held.keys() == after.keys() and all(torch.equal(held[k], after[k]) for k in held)
    with pytest.raises(RuntimeError), tiny_pythia.memory_aside():
        raise RuntimeError("boom")  # restored on the way out of an exception too
    assert tiny_pythia.get_memory_state() is not None
