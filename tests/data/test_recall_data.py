"""Associative-recall batches: layout, uniform values (chance = 1 / n_values), token ids from a tokenizer."""
from __future__ import annotations

import pytest
import torch

from newllm import load_tokenizer
from newllm.data.recall import make_recall_batch, recall_vocab
from newllm.errors import NewLLMError


@pytest.fixture(scope="module")
def tok(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")


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


@pytest.mark.parametrize("n_pairs,S", [(2, 8), (4, 9), (8, 64)])
def test_recall_distance_and_gap_are_exact(n_pairs, S):
    from newllm.data.recall import recall_distance, recall_gap

    for gap in (1, 2, 5):
        ids, labels = make_recall_batch(n_pairs, S, 3, torch.Generator().manual_seed(gap), n_segments_gap=gap)
        pair_end = 2 * n_pairs - 1  # the last pair's value
        answers = (labels[0] != -100).nonzero().flatten()  # value positions, each predicted at t - 1 (its key)
        assert int(answers.min()) - 1 - pair_end == recall_distance(n_pairs, S, gap)
    for distance in range(1, 5 * S):
        gap = recall_gap(distance, n_pairs, S)
        assert recall_distance(n_pairs, S, gap) >= distance
        assert gap == 1 or recall_distance(n_pairs, S, gap - 1) < distance  # the smallest such gap
