"""generate through transformers with newllm's per-layer state: greedy equals TransformerLM.generate,
a carried memory state continues exactly, beam search moves the state's rows with its beams."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import newllm.hf as nh
from newllm import NewLLMError
from tests.hf.tiny import ALL_PRESETS, V, ids, tiny

N_NEW = 7
MEMORY_PRESETS = ["infini", "multi_memory", "hierarchical", "llama_infini", "infini_all", "context_pythia", "pythia"]


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_greedy_generate_equals_transformer_lm_generate(name):
    model = tiny(name)
    hf = nh.to_hf(model)
    x = ids(2, 9)
    ours = model.generate(x, max_new_tokens=N_NEW)
    theirs = hf.generate(x, max_new_tokens=N_NEW, do_sample=False)
    assert theirs.shape == (2, 9 + N_NEW)
    assert torch.equal(theirs, ours)


def test_greedy_generate_stops_at_eos_like_transformer_lm():
    model = tiny("pythia")
    hf = nh.to_hf(model)
    x = ids(2, 9)
    free = model.generate(x, max_new_tokens=N_NEW)
    eos = int(free[0, 9 + 2])  # row 0 produces it at its third new token
    ours = model.generate(x, max_new_tokens=N_NEW, eos_token_id=eos)
    theirs = hf.generate(x, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(theirs, ours)
    assert bool((ours[0, 9 + 2:] == eos).all())


@pytest.mark.parametrize("name", MEMORY_PRESETS)
def test_generate_continues_from_a_carried_memory_state(name):
    """hf.generate(B, state=<after A>) == our own continuation == generating from A + B in one go."""
    model = tiny(name)
    hf = nh.to_hf(model)
    a, b = ids(1, 21, seed=3), ids(1, 5, seed=4)
    model.reset_memory()
    model(a, update_memory=True)
    memory = model.get_memory_state()  # a ModelMemoryState, as carried to another machine
    ours = model.generate(b, max_new_tokens=N_NEW)  # TransformerLM.generate reads the held memory
    model.reset_memory()
    theirs = hf.generate(b, state=memory, max_new_tokens=N_NEW, do_sample=False)
    assert torch.equal(theirs, ours)
    raw = hf(a).state  # the raw per-layer tuple works too
    assert torch.equal(hf.generate(b, state=raw, max_new_tokens=N_NEW, do_sample=False), ours)
    whole = hf.generate(torch.cat((a, b), 1), max_new_tokens=N_NEW, do_sample=False)
    assert torch.equal(whole[:, a.shape[1]:], ours)  # one call == any split, through generate
    no_cache = hf.generate(b, state=memory, max_new_tokens=N_NEW, do_sample=False, use_cache=False)
    assert torch.equal(no_cache, ours)  # every step reruns the whole prompt from the carried state


def test_a_state_from_other_weights_is_refused():
    model, other = tiny("infini", seed=0), tiny("infini", seed=1)
    other(ids(1, 9), update_memory=True)
    with pytest.raises(NewLLMError, match="other weights"):
        nh.to_hf(model).generate(ids(1, 3), state=other.get_memory_state(), max_new_tokens=2)


def test_reorder_cache_moves_every_batched_row():
    model = tiny("infini")
    hf = nh.to_hf(model)
    state = hf(ids(3, 11)).state  # infini layer state + KV caches, rows differ
    beam_idx = torch.tensor([2, 0, 0])
    new = hf._reorder_cache(state, beam_idx)
    checked = 0
    for old_s, new_s in zip(state, new):
        for old_t, new_t in zip(old_s, new_s):
            if old_t.dim() == 0:  # counters (next position, tokens absorbed) are shared by the batch
                assert torch.equal(old_t, new_t)
                continue
            assert not torch.equal(old_t[0], old_t[2])  # the check below can fail
            for b, src in enumerate(beam_idx.tolist()):
                assert torch.equal(new_t[b], old_t[src])
            checked += 1
    assert checked >= 4


def test_beam_search_equals_the_native_gpt_neox_model(tmp_path):
    """Our wrapper's beams (state reordered by _reorder_cache) == transformers' own GPT-NeoX beams."""
    import transformers

    model = tiny("pythia")
    native = transformers.AutoModelForCausalLM.from_pretrained(nh.export_native(model, tmp_path / "neox")).eval()
    hf = nh.to_hf(model)
    x = ids(2, 6)
    kw = dict(max_new_tokens=N_NEW, num_beams=4, num_return_sequences=2, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    ours, ref = hf.generate(x, **kw), native.generate(x, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    assert torch.allclose(ours.sequences_scores, ref.sequences_scores, rtol=0, atol=1e-5)


def _score(model, state_row, prompt, new):
    """Sum of log p(new tokens) given the carried state row and the prompt (our model, no transformers)."""
    with torch.no_grad():
        out = model(torch.cat((prompt, new))[None, :-1], state=state_row)
    logp = F.log_softmax(out.logits[0, prompt.numel() - 1:].double(), -1)
    return float(logp.gather(-1, new[:, None]).sum())


@pytest.mark.parametrize("name", ["infini", "hierarchical"])
def test_beam_search_from_a_batch_of_carried_states(name):
    """Two prompts, each with its own carried memory (batch-2 state, repeated per beam): every returned
    beam's score equals the log-likelihood our model gives it from that prompt's own state row."""
    model = tiny(name)
    hf = nh.to_hf(model)
    state = hf(ids(2, 19, seed=5)).state
    x = ids(2, 4, seed=6)
    out = hf.generate(x, state=state, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
                      output_scores=True, return_dict_in_generate=True, length_penalty=0.0, pad_token_id=0)
    assert out.sequences.shape == (6, 9)
    for r in range(6):
        row = r // 3
        one = tuple(None if s is None else type(s)(*(t[row:row + 1] if t.dim() else t for t in s)) for s in state)
        want = _score(model, one, x[row], out.sequences[r, 4:])
        assert abs(float(out.sequences_scores[r]) - want) < 1e-4, (r, float(out.sequences_scores[r]), want)
    assert len({tuple(s.tolist()) for s in out.sequences[:3]}) == 3  # three distinct beams


def test_padding_and_foreign_cache_arguments_are_refused():
    hf = nh.to_hf(tiny("pythia"))
    x = ids(2, 5)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding
    with pytest.raises(NewLLMError, match="attention_mask has padding"):
        hf.generate(x, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(NewLLMError, match="past_key_values= is not how newllm carries state"):
        hf.generate(x, past_key_values=object(), max_new_tokens=2)
    with pytest.raises(ValueError, match="not used by the model"):
        hf.generate(x, max_new_tokens=2, stat=1)  # a typo is caught (forward takes no **kwargs)
    assert hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2).shape == (2, 7)
    assert int(hf.generate(x[:1], max_new_tokens=1).max()) < V
