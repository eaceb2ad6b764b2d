"""Sliding-window perplexity: equal to the perplexity-guide loop (one window at a time, unbatched) and to
the exact full-context NLL; word PPL / bits per byte; the low-PPL warning; one-line errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from newllm import NewLLMError, create_model
from newllm.eval import sliding_window_perplexity, window_plan
from tests.stubs import StubLM

V = 97
TINY = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)
REL = 1e-6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("pythia", **TINY).eval()


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def guide_loop(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity-guide loop, one window at a time; NLL summed exactly per token."""
    n, prev_end, nll, count = ids.numel(), 0, 0.0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end  # may differ from stride on the last window
        input_ids = ids[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        logits = model(input_ids).logits
        labels = target_ids[0, 1:]  # the label shift: position t predicts t+1
        nll += F.cross_entropy(logits[0, :-1], labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
        prev_end = end
        if end == n:
            break
    return nll, count


@pytest.mark.parametrize("n,context,stride", [
    (150, 32, 8),    # stride < context
    (150, 32, 32),   # stride = context: disjoint windows, each window's first token unscored
    (150, 32, 12),   # a short last window (starts at 120, 30 tokens)
    (20, 32, 8),     # a text shorter than one window
    (97, 16, 15),    # stride one less than context
])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_equals_guide_loop(model, n, context, stride, batch_size):
    ids = ids_of(n)
    ref_nll, ref_count = guide_loop(model, ids, context, stride)
    res = sliding_window_perplexity(model, ids, context=context, stride=stride, batch_size=batch_size, progress=False)
    assert res.n_tokens == ref_count
    assert res.nll_sum == pytest.approx(ref_nll, rel=REL)
    assert res.token_ppl == pytest.approx(math.exp(ref_nll / ref_count), rel=REL)
    assert res.n_windows == len(window_plan(n, context, stride))


def test_scored_token_counts(model):
    # stride < context scores every token but the first; stride == context skips each window's first token
    assert sliding_window_perplexity(model, ids_of(150), 32, 8, progress=False).n_tokens == 149
    assert sliding_window_perplexity(model, ids_of(150), 32, 32, progress=False).n_tokens == 150 - 5


@pytest.mark.parametrize("context", [60, 64, 500])
def test_full_context_equals_one_forward(model, context):
    ids = ids_of(60, seed=3)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    exact = F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum").item()
    res = sliding_window_perplexity(model, ids, context=context, stride=7, progress=False)
    assert res.n_tokens == 59 and res.n_windows == 1
    assert res.nll_sum == pytest.approx(exact, rel=REL)


def test_window_plan():
    assert window_plan(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert window_plan(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert window_plan(3, 8, 2) == [(0, 3, 1)]


class KeepLogits(StubLM):
    """Computes every position's logits with the wrapped model (the full path) and keeps the last
    `logits_to_keep` of them; records (window length, logits_to_keep) of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []

    def forward(self, ids, logits_to_keep: int = 0):
        out = self.inner(ids)
        self.calls.append((ids.shape[1], logits_to_keep))
        if logits_to_keep:
            out.logits = out.logits[:, -logits_to_keep:]
        return out


def test_logits_to_keep_path(model):
    wrapped = KeepLogits(model)
    ids = ids_of(150)
    res = sliding_window_perplexity(wrapped, ids, context=32, stride=8, batch_size=4, progress=False)
    ref = sliding_window_perplexity(model, ids, context=32, stride=8, batch_size=4, progress=False)
    # the full path cut afterwards == TransformerLM projecting only the kept positions
    assert res.nll_sum == pytest.approx(ref.nll_sum, rel=REL) and res.n_tokens == ref.n_tokens
    assert (32, 9) in wrapped.calls  # later windows project only their 8 new tokens (+1 for the shift)


def test_transformer_lm_projects_only_scored_positions(model):
    ids = ids_of(40)[None]
    with torch.no_grad():
        full = model(ids).logits
        tail = model(ids, logits_to_keep=9).logits
    torch.testing.assert_close(tail, full[:, -9:], atol=1e-6, rtol=0)
    with pytest.raises(NewLLMError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=3)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:2]))
    try:
        sliding_window_perplexity(model, ids_of(150), context=32, stride=8, batch_size=4, progress=False)
    finally:
        hook.remove()
    # the first window alone (it scores 31 tokens), 14 full windows (4 + 4 + 4 + 2) scoring 8 new tokens
    # each, and the short last one [120, 150), which scores [144, 150); logits kept: scored + 1 (the shift)
    assert [tuple(r) for r in rows] == [(1, 32), (4, 9), (4, 9), (4, 9), (2, 9), (1, 7)]


def test_held_memory_set_aside_and_restored():
    torch.manual_seed(0)
    model = create_model("infini", **TINY, segment_length=8).eval()
    ids = ids_of(80)
    clean = sliding_window_perplexity(model, ids, context=24, stride=8, progress=False)
    probe = ids_of(16, seed=5)[None]
    with torch.no_grad():
        model(ids_of(40, seed=9)[None], update_memory=True)
        with_memory = model(probe).logits  # reads the held memory
        model.reset_memory()
        without = model(probe).logits
        model(ids_of(40, seed=9)[None], update_memory=True)
    assert not torch.allclose(with_memory, without, atol=1e-3)  # the held memory matters
    res = sliding_window_perplexity(model, ids, context=24, stride=8, progress=False)
    assert res.nll_sum == pytest.approx(clean.nll_sum, rel=REL)  # every window starts from an empty memory
    with torch.no_grad():
        torch.testing.assert_close(model(probe).logits, with_memory, atol=1e-6, rtol=0)  # and it is back


def test_training_mode_restored(model):
    model.train()
    try:
        sliding_window_perplexity(model, ids_of(40), 16, 8, progress=False)
        assert model.training
    finally:
        model.eval()


def test_word_ppl_and_bits_per_byte(model):
    ids = ids_of(50)
    text = "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.\n"
    res = sliding_window_perplexity(model, ids, 16, 8, text=text, progress=False)
    n_bytes = len(text.encode("utf-8"))
    assert res.n_words == 10 and res.n_bytes == n_bytes == len(text) + 4  # ö ä ü ß are two bytes each
    assert res.word_ppl == pytest.approx(math.exp(res.nll_sum / 10), rel=1e-12)
    assert res.bits_per_byte == pytest.approx(res.nll_sum / math.log(2) / n_bytes, rel=1e-12)
    plain = sliding_window_perplexity(model, ids, 16, 8, progress=False)
    assert plain.word_ppl is None and plain.bits_per_byte is None and plain.n_words is None


class Leaky(StubLM):
    """A 'model' that sees the next token: what a broken causal mask looks like from outside."""

    def __init__(self):
        super().__init__()
        self.config = create_model("pythia", **TINY).config
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, logits_to_keep: int = 0):
        logits = F.one_hot(torch.roll(ids, -1, dims=1), V).float() * 20.0
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()


def test_warns_on_suspiciously_low_ppl(model):
    ids = ids_of(100)
    with pytest.warns(UserWarning, match="data leak .* broken causal mask"):
        res = sliding_window_perplexity(Leaky(), ids, 32, 16, progress=False)
    assert res.token_ppl < 1.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sliding_window_perplexity(model, ids, 32, 16, progress=False).token_ppl > 50  # a random model


@pytest.mark.parametrize("kwargs,match", [
    (dict(context=8, stride=9), "stride 9 > context 8"),
    (dict(stride=0), "stride must be > 0"),
    (dict(stride=-4), "stride must be > 0"),
    (dict(batch_size=0), "batch_size must be > 0"),
    (dict(context=4096), r"context 4096 is longer than the model supports \(max_position_embeddings=2048\)"),
    (dict(token_ids=[]), "empty token list"),
    (dict(token_ids=[5]), "text has 1 token; at least 2"),
    (dict(token_ids=[1, 2, 3, V, 4]), rf"token id {V} at position 3 is outside the vocabulary \[0, {V}\)"),
    (dict(token_ids=[1, -1]), r"token id -1 at position 1"),
    (dict(token_ids=torch.zeros(2, 5, dtype=torch.long)), r"must be 1-D .* shape \(2, 5\)"),
    (dict(text="  \n"), "text= has no words"),
])
def test_bad_input(model, kwargs, match):
    args = {**dict(token_ids=ids_of(40), context=16, stride=8, progress=False), **kwargs}
    with pytest.raises(NewLLMError, match=match):
        sliding_window_perplexity(model, **args)
