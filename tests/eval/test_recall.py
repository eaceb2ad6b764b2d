"""Associative recall: scoring on stub models whose answers we control, from an empty memory."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from newllm import create_model
from newllm.data.recall import make_recall_batch, recall_vocab
from newllm.eval.recall import recall_eval
from tests.stubs import StubLM


class NextTokenOracle(StubLM):
    """Logits that predict the true next token at every position (or always `const`)."""

    def __init__(self, vocab, const=None):
        super().__init__()
        self.vocab, self.const = vocab, const

    def forward(self, ids):
        target = torch.full_like(ids, self.const) if self.const is not None else torch.roll(ids, -1, 1)
        return SimpleNamespace(logits=nn.functional.one_hot(target, self.vocab).float())


def test_recall_eval_counts_labelled_positions_only():
    v = recall_vocab(n_keys=8, n_values=4)
    ids, labels = make_recall_batch(3, 7, 50, torch.Generator().manual_seed(0), n_segments_gap=2, vocab=v)
    assert recall_eval(NextTokenOracle(20), ids, labels) == 1.0
    const = v.values[0]
    expect = float((labels[labels != -100] == const).float().mean())
    assert 0 < expect < 1 and recall_eval(NextTokenOracle(20, const), ids, labels) == pytest.approx(expect, abs=1e-7)
    assert recall_eval(NextTokenOracle(20, v.filler), ids, labels) == 0.0


def test_recall_eval_reads_no_held_memory_and_puts_it_back():
    torch.manual_seed(0)
    model = create_model("infini", vocab_size=35, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         num_hidden_layers=2, segment_length=9)
    ids, labels = make_recall_batch(4, 9, 16, torch.Generator().manual_seed(0))
    clean = recall_eval(model, ids, labels)
    with torch.no_grad():
        model(ids[:1], update_memory=True)
        with_memory = model(ids).logits
    model.train()
    assert recall_eval(model, ids, labels) == clean  # from an empty memory
    assert model.training and model.get_memory_state().tokens_absorbed == ids.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, with_memory, atol=1e-6, rtol=0)  # the memory is back
