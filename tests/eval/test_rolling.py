"""newllm.eval.rolling (lm-eval's protocol) against lm-evaluation-harness itself.

The window plan, the detokeniser and the word counts are compared with lm-eval's own functions; the
metrics with lm-eval's HFLM run on the same tiny model (a byte-level BPE learned here from WikiText-2,
a randomised model whose predictions depend strongly on position and context), to 1e-4 relative.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from newllm import NewLLMError, create_model
from newllm.eval.rolling import lm_eval_words, rolling_perplexity, rolling_windows, wikitext_detokenize

lm_eval = pytest.importorskip("lm_eval")

REL = 1e-4


def lm_eval_inputs(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(model input, scored targets) per window, exactly as HFLM.loglikelihood_rolling builds them."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    out = []
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tokens, prefix, max_length, 1)):
        out.append(((ctx + cont)[-(max_length + 1):][:-1], cont))  # HFLM._loglikelihood_tokens
    return out


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("max_length", [1, 3, 8])
def test_windows_are_lm_evals(n, max_length):
    tokens = list(range(100, 100 + n))
    s = [7, *tokens]
    ours = [(s[b:e], s[e - k + 1:e + 1]) for b, e, k in rolling_windows(n, max_length)]
    assert ours == lm_eval_inputs(tokens, 7, max_length)
    assert sum(len(t) for _, t in ours) == n  # every token scored once


def test_detokeniser_and_counts_are_lm_evals(shared_dir):
    from newllm.data.corpora import load_documents
    from newllm.eval.harness import _lm_eval_wikitext_module

    pw = _lm_eval_wikitext_module()
    pages = load_documents("wikitext-2", "valid", shared_dir) + load_documents("wikitext-2", "test", shared_dir)
    assert len(pages) == 120
    changed = 0
    for page in pages:
        assert wikitext_detokenize(page) == pw.wikitext_detokenizer({"page": page})
        changed += wikitext_detokenize(page) != page
        ll, words = pw.process_results({"page": page}, [-1.0])["word_perplexity"]
        assert lm_eval_words(page) == words and words != len(page.split())  # the trailing newline counts
    assert changed == 120


def test_one_window_is_the_plain_log_likelihood():
    torch.manual_seed(0)
    model = create_model("pythia", vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                         num_hidden_layers=1).eval()
    tokens = torch.randint(0, 50, (12,)).tolist()
    text = "a b  c\n"
    r = rolling_perplexity(model, [(tokens, text)], max_length=64, prefix_token_id=3, progress=False)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([[3, *tokens[:-1]]])).logits[0].double(), -1)
    want = float(logp.gather(-1, torch.tensor(tokens)[:, None]).sum())
    assert r.n_windows == 1 and r.n_tokens == 12
    assert math.isclose(r.loglikelihood, want, rel_tol=1e-6)  # fp32 log-softmax against a float64 one
    assert r.n_words == len(re.split(r"\s+", text)) == 4 and r.n_bytes == 7
    assert math.isclose(r.bits_per_byte, -r.loglikelihood / 7 / math.log(2), rel_tol=1e-12)
    assert math.isclose(r.word_perplexity, math.exp(-r.loglikelihood / 4), rel_tol=1e-12)


def test_bad_input_is_one_line():
    model = create_model("pythia", vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                         num_hidden_layers=1, max_position_embeddings=32)
    for docs, kw, msg in [([], {}, "no documents"), ([([], "x")], {}, "document 0 has no tokens"),
                          ([([1, 60], "x")], {}, "token id 60"), ([([1], "x")], {"max_length": 64}, "max_length 64"),
                          ([([1], "x")], {"prefix_token_id": 99}, "prefix token id 99")]:
        with pytest.raises(NewLLMError, match=msg):
            rolling_perplexity(model, docs, **{"max_length": 16, "prefix_token_id": 0, **kw})


@pytest.fixture(scope="module")
def tiny_setup(shared_dir):
    """A BPE learned on three WikiText-2 valid pages, a randomised model over it, and the pages."""
    from newllm.data.bpe import train_bpe
    from newllm.eval.harness import wikitext_pages
    from tests.hf.tiny import randomise

    pages = wikitext_pages("valid", limit=3, data_dir=shared_dir)
    tok = train_bpe(pages, vocab_size=400)
    torch.manual_seed(0)
    model = randomise(create_model("infini", vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=4,
                                   intermediate_size=64, num_hidden_layers=2, segment_length=12,
                                   max_position_embeddings=48), scale=0.3)
    return tok, model, pages


@pytest.mark.slow
def test_metrics_equal_lm_evals_on_the_same_model(tiny_setup):
    """lm-eval (HFLM on the transformers wrapper, its wikitext task on local pages) == newllm.eval.rolling."""
    import newllm.hf as nh
    from newllm.eval.harness import METRICS, prefix_token_id, run_harness, wikitext_task

    tok, model, pages = tiny_setup
    ht = nh.hf_tokenizer(tok)
    prefix = prefix_token_id(ht)
    assert prefix == tok.eos_token_id == 0  # this BPE has no BOS: lm-eval falls back to EOS
    theirs = run_harness(nh.to_hf(model), ht, [wikitext_task(pages)], max_length=48, batch_size=3)["wikitext"]
    docs = [(tok.backend.encode(wikitext_detokenize(p), add_special_tokens=False).ids, p) for p in pages]
    assert all(ht.encode(wikitext_detokenize(p)) == d for (d, _), p in zip(docs, pages))  # same token ids
    ours = rolling_perplexity(model, docs, max_length=48, prefix_token_id=prefix, batch_size=5, progress=False)
    assert ours.n_windows > 3 * len(pages)  # several windows per page: the window rule is exercised
    assert 1.5 < ours.bits_per_byte < 20  # a model far from uniform and far from perfect
    for m in METRICS:
        assert abs(getattr(ours, m) - theirs[f"{m},none"]) <= REL * abs(theirs[f"{m},none"]), m
    # the totals agree far closer than 1e-4: a plan that skipped each page's first token (one token in
    # ~5,000, 7e-5 of the total) would fail this
    ll_theirs = -theirs["bits_per_byte,none"] * ours.n_bytes * math.log(2)
    assert abs(ours.loglikelihood - ll_theirs) <= 1e-6 * abs(ll_theirs)
    with torch.no_grad():
        first = F.log_softmax(model(torch.tensor([[prefix]])).logits[0, -1].double(), -1)
    skipped = ours.loglikelihood - sum(float(first[d[0]]) for d, _ in docs)
    assert abs(skipped - ll_theirs) > 10 * 1e-6 * abs(ll_theirs)
