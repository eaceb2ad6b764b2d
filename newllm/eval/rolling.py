"""Perplexity in lm-evaluation-harness's protocol (`loglikelihood_rolling`): per document, disjoint windows.

newllm's own evaluator (perplexity.py) slides a window over one token stream; lm-eval scores each
document on its own, so its numbers are not comparable with ours unless we follow its protocol
exactly. This module does, written from lm-eval 0.4's `HFLM.loglikelihood_rolling`,
`utils.get_rolling_token_windows(context_len=1)` + `make_disjoint_window` and the wikitext task,
and is checked against lm-eval itself (tests/eval/test_rolling.py):

* a document's text (for wikitext: detokenised, `wikitext_detokenize`) is encoded on its own, with no
  special tokens; `s = [prefix] + tokens` where prefix is lm-eval's `prefix_token_id` (the tokenizer's
  BOS, else its EOS), so the first token is predicted from the prefix alone;
* with L = max_length the tokens are scored in consecutive blocks of L (the last may be shorter); a
  block is predicted from the L tokens of `s` just before each of its tokens' positions, i.e. the
  window is `s[e - L : e]` for a block ending at token e, so the first block sees only the prefix
  and earlier blocks' tokens are never re-scored (only the last, short block has more than one token
  of earlier context);
* every window starts from an empty model state (no memory carried between windows or documents);
* loglikelihood = sum of log p over all of a document's tokens; over the documents
    word_perplexity = exp(-sum ll / sum words),  byte_perplexity = exp(-sum ll / sum bytes),
    bits_per_byte  = -sum ll / sum bytes / ln 2,
  where words = `len(re.split(r"\\s+", original))` and bytes = UTF-8 bytes of the ORIGINAL document
  (before detokenisation), as lm-eval's wikitext `process_results` counts them.

Log-probabilities are summed per token in float64 (lm-eval sums each window's float32 log-softmax
in float32; the two agree far inside the 1e-4 relative the tests ask for).
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from newllm.errors import NewLLMError
from newllm.eval.perplexity import SUSPICIOUS_PPL, _exp


@dataclass
class RollingResult:
    loglikelihood: float  # sum over documents of sum over tokens of log p, nats
    n_documents: int
    n_tokens: int
    n_words: int
    n_bytes: int
    n_windows: int
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    token_perplexity: float
    per_document: list[float]  # each document's loglikelihood

    def to_dict(self) -> dict:
        return asdict(self)


def lm_eval_words(text: str) -> int:
    """Words as lm-eval's wikitext task counts them: `len(re.split(r"\\s+", text))` (a leading or
    trailing run of whitespace counts as a word boundary with an empty word, as there)."""
    return len(re.split(r"\s+", text))


def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenised spelling undone, rule for rule as lm-eval's `wikitext_detokenizer`
    (`@-@` -> `-`, ` , ` -> `, `, brackets and quotes closed up, heading `= =` -> `==`, ...)."""
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return s


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window over `s = [prefix] + tokens` (length n_tokens + 1): the model
    reads `s[begin:end]` and its last `n_scored` positions predict `s[end - n_scored + 1 : end + 1]`."""
    if max_length < 1:
        raise NewLLMError(f"max_length must be >= 1, got {max_length}")
    plan, done = [], 0
    while done < n_tokens:
        block = min(max_length, n_tokens - done)
        end = done + block  # s-position of the block's last input token
        plan.append((max(0, end - max_length), end, block))
        done += block
    return plan


@torch.inference_mode()
def rolling_perplexity(model, documents: Sequence[tuple[Sequence[int], str]], max_length: int, prefix_token_id: int,
                       batch_size: int = 1, progress: bool = True) -> RollingResult:
    """lm-eval's `loglikelihood_rolling` metrics (module doc) for `documents`, each a pair (token ids of
    the text the model scores, the original text the words and bytes are counted on).

    `model` is a `TransformerLM` (or anything with its `model(ids, logits_to_keep=k).logits` and
    `memory_aside`). Windows of the same length and number of scored tokens run `batch_size` at a time.
    """
    from tqdm.auto import tqdm

    if not documents:
        raise NewLLMError("rolling_perplexity: no documents")
    if batch_size < 1:
        raise NewLLMError(f"rolling_perplexity: batch_size must be >= 1, got {batch_size}")
    vocab, max_pos = model.config.vocab_size, model.config.max_position_embeddings
    if max_pos is not None and max_length > max_pos:
        raise NewLLMError(f"rolling_perplexity: max_length {max_length} is longer than the model supports "
                          f"(max_position_embeddings={max_pos})")
    if not 0 <= prefix_token_id < vocab:
        raise NewLLMError(f"rolling_perplexity: prefix token id {prefix_token_id} is outside the vocabulary [0, {vocab})")
    seqs, jobs = [], []  # jobs: (document, begin, end, n_scored)
    for d, (ids, original) in enumerate(documents):
        ids = [int(i) for i in ids]
        if not ids:
            raise NewLLMError(f"rolling_perplexity: document {d} has no tokens")
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise NewLLMError(f"rolling_perplexity: document {d}: token id {bad} is outside the vocabulary [0, {vocab})")
        if not isinstance(original, str):
            raise NewLLMError(f"rolling_perplexity: document {d}: the original text must be a str")
        seqs.append(torch.tensor([prefix_token_id, *ids], dtype=torch.long))
        jobs += [(d, *w) for w in rolling_windows(len(ids), max_length)]
    groups: dict[tuple[int, int], list] = {}
    for job in jobs:
        groups.setdefault((job[2] - job[1], job[3]), []).append(job)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]

    p = next(model.parameters(), None)
    device = torch.device("cpu") if p is None else p.device
    per_doc = [0.0] * len(documents)
    bar = tqdm(total=len(jobs), disable=None if progress else True, unit="win", desc="lm-eval protocol")
    try:
        with model.memory_aside(train=False):
            for batch in batches:
                n_scored = batch[0][3]
                x = torch.stack([seqs[d][b:e] for d, b, e, _ in batch]).to(device)  # (B, T)
                logits = model(x, logits_to_keep=n_scored).logits.float()  # (B, n_scored, V)
                logp = F.log_softmax(logits, dim=-1)
                for row, (d, b, e, k) in enumerate(batch):
                    target = seqs[d][e - k + 1:e + 1].to(device)
                    per_doc[d] += float(logp[row].gather(-1, target[:, None]).double().sum())
                bar.update(len(batch))
    finally:
        bar.close()

    ll = sum(per_doc)
    n_tokens = sum(len(s) - 1 for s in seqs)
    words = sum(lm_eval_words(orig) for _, orig in documents)
    n_bytes = sum(len(orig.encode("utf-8")) for _, orig in documents)
    if words == 0 or n_bytes == 0:
        raise NewLLMError("rolling_perplexity: the original texts have no bytes")
    if not math.isfinite(ll):
        warnings.warn(f"lm-eval protocol: the loglikelihood over {n_tokens} tokens is {ll} (NaN/Inf weights or an "
                      "overflow)", RuntimeWarning, stacklevel=2)
    token_ppl = _exp(-ll / n_tokens)
    if token_ppl < SUSPICIOUS_PPL:
        warnings.warn(f"token perplexity {token_ppl:.3f} < {SUSPICIOUS_PPL:g}: on natural text this means a data leak "
                      "or a broken causal mask until shown otherwise", stacklevel=2)
    return RollingResult(loglikelihood=ll, n_documents=len(documents), n_tokens=n_tokens, n_words=words,
                         n_bytes=n_bytes, n_windows=len(jobs), word_perplexity=_exp(-ll / words),
                         byte_perplexity=_exp(-ll / n_bytes), bits_per_byte=-ll / n_bytes / math.log(2),
                         token_perplexity=token_ppl, per_document=per_doc)
