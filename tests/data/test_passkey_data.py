"""Passkey prompts (real GPT-NeoX tokenizer), the scorer, and the associative-recall batches."""
from __future__ import annotations

import random

import pytest
import torch

from newllm import load_tokenizer
from newllm.data.passkey import (FILLER_SENTENCES, INTRO, QUESTION, make_passkey_grid, make_passkey_sample,
                                 make_recall_batch, recall_vocab, score_passkey)
from newllm.errors import NewLLMError


@pytest.fixture(scope="module")
def tok(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")


@pytest.fixture(scope="module")
def unit(tok):
    return sum(len(tok.encode(s)) for s in FILLER_SENTENCES)


LENGTHS, DEPTHS = [128, 300, 1000], [0.0, 0.25, 0.5, 0.75, 1.0]


def test_grid_is_deterministic_in_the_seed(tok):
    a = make_passkey_grid(tok, LENGTHS, DEPTHS, 2, seed=7)
    b = make_passkey_grid(tok, LENGTHS, DEPTHS, 2, seed=7)
    c = make_passkey_grid(tok, LENGTHS, DEPTHS, 2, seed=8)
    assert len(a) == len(LENGTHS) * len(DEPTHS) * 2
    assert [s.ids for s in a] == [s.ids for s in b] and [s.passkey for s in a] == [s.passkey for s in b]
    assert sum(x.passkey != y.passkey for x, y in zip(a, c)) >= len(a) - 2  # 5-digit keys rarely collide
    assert [(s.length, s.depth) for s in a] == [(L, d) for L in LENGTHS for d in DEPTHS for _ in range(2)]
    assert all(len(s.passkey) == 5 and s.passkey[0] != "0" for s in a)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_length_depth_and_text(tok, unit, length, depth):
    s = make_passkey_sample(tok, length, depth, random.Random(3))
    assert length - unit < len(s.ids) <= length
    text = tok.decode(s.ids)
    needle = f"The pass key is {s.passkey}. Remember it. {s.passkey} is the pass key."
    assert text.count(needle) == 1 and text.endswith("The pass key is")
    assert text.startswith("There is an important info hidden")
    # key_position is the needle's first token, exactly
    assert tok.decode(s.ids[s.key_position:]).startswith(" " + needle)
    # depth: the needle sits after round(depth * sentences) filler sentences, so its place in the filler is
    # off by at most one sentence's tokens; in the whole prompt the intro and question shift it a little more
    intro = len(tok.encode(INTRO))
    filler = len(s.ids) - intro - len(tok.encode(" " + needle)) - len(tok.encode(QUESTION))
    longest = max(len(tok.encode(x)) for x in FILLER_SENTENCES)
    assert abs((s.key_position - intro) / filler - depth) <= longest / filler
    assert abs(s.key_position / len(s.ids) - depth) <= (intro + longest) / len(s.ids)


def test_prompt_tokens_equal_the_joined_text(tok):
    s = make_passkey_sample(tok, 500, 0.4, 11)
    assert tok.encode(tok.decode(s.ids)) == s.ids  # byte-level BPE: pieces concatenate exactly


def test_bad_passkey_input(tok):
    with pytest.raises(NewLLMError, match="shorter than the prompt without filler"):
        make_passkey_sample(tok, 20, 0.5, 0)
    with pytest.raises(NewLLMError, match="depth must be in"):
        make_passkey_sample(tok, 200, 1.5, 0)
    with pytest.raises(NewLLMError, match="digits must be"):
        make_passkey_sample(tok, 200, 0.5, 0, digits=0)


@pytest.mark.parametrize("text,ok", [(" 71432.", True), ("71432", True), (" 71432 is it", True),
                                     (" 7143", False), (" 714325", False), (" no digits.", False), ("", False),
                                     (" 1 71432", False), (" 71,432", False)])
def test_score_passkey(text, ok):
    assert score_passkey(text, "71432") is ok


@pytest.mark.parametrize("gap", [1, 3])
def test_recall_keys_only_in_an_earlier_segment(gap):
    n, S = 3, 8
    v = recall_vocab(n_keys=10, n_values=12)
    ids, labels = make_recall_batch(n, S, 16, torch.Generator().manual_seed(0), n_segments_gap=gap, vocab=v)
    assert ids.shape == labels.shape == (16, S * (1 + gap))
    assert int((labels != -100).sum()) == 16 * n
    for row, lab in zip(ids, labels):
        answers = (lab != -100).nonzero().flatten().tolist()
        assert answers == list(range(S * (1 + gap) - 2 * n + 1, S * (1 + gap), 2))  # the query values, last segment
        for t in answers:
            key, value = row[t - 1], lab[t]
            assert row[t] == value and int(value) in v.values and int(key) in v.keys
            earlier = (row[:t - 1] == key).nonzero().flatten()
            assert len(earlier) == 1 and earlier[0] < S and row[earlier[0] + 1] == value  # once, in segment 0
        assert (row[2 * n:S * gap + S - 2 * n] == v.filler).all()  # only filler between pairs and queries
        assert len(set(row[:2 * n:2].tolist())) == n  # distinct keys


def test_recall_values_are_uniform_so_chance_is_one_over_n_values():
    v = recall_vocab(n_keys=16, n_values=8)
    _, labels = make_recall_batch(4, 9, 2000, torch.Generator().manual_seed(1), vocab=v)
    answers = labels[labels != -100]
    freq = torch.bincount(answers - min(v.values), minlength=8).float() / answers.numel()
    # 8000 draws: each value's frequency within 0.02 of 1/8 (about 5 standard deviations)
    assert (freq - 1 / 8).abs().max() < 0.02


def test_recall_vocab_from_a_real_tokenizer(tok):
    v = recall_vocab(tok, n_keys=16, n_values=16)
    assert [tok.decode([i]) for i in v.values] == [f" {i}" for i in range(16)]
    assert tok.decode([v.filler]) == " the" and tok.decode([v.keys[0]]) == " apple"
    ids, labels = make_recall_batch(4, 9, 2, torch.Generator().manual_seed(0), tokenizer=tok)
    assert set(ids.flatten().tolist()) <= set(v.keys) | set(v.values) | {v.filler}


def test_recall_vocab_falls_back_to_characters_for_a_small_bpe(shared_dir):
    from newllm.data.bpe import train_bpe

    small = train_bpe([(shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:20000]], 300)
    v = recall_vocab(small, n_keys=16, n_values=16)
    assert [small.decode([i]) for i in v.keys] == list("abcdefghijklmnop")
    assert [small.decode([i]) for i in v.values] == list("ABCDEFGHIJKLMNOP") and small.decode([v.filler]) == "."


def test_bad_recall_input():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(NewLLMError, match="segment_length 6 < 2 \\* n_pairs \\+ 1 = 7"):
        make_recall_batch(3, 6, 2, g)
    with pytest.raises(NewLLMError, match="n_pairs must be in"):
        make_recall_batch(20, 64, 2, g, n_keys=16)
