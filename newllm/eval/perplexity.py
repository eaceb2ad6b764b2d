"""Sliding-window perplexity (the Hugging Face perplexity-guide method), batched.

Windows of `context` tokens start `stride` apart: window k covers ``[k*stride, min(k*stride+context, N))``
and the last window is the first one that reaches the end of the text (it may be shorter). Each
window scores only the tokens new to it, ``[prev_end, end)``, predicted from everything before them
inside the window; the first window scores all its tokens but the first (nothing predicts token 0).
So with ``stride < context`` every token 1..N-1 is scored exactly once with at least
``context - stride`` tokens of context (except near the start), and with ``stride == context`` the
windows are disjoint and each window's first token goes unscored, as in the guide.

    token PPL      = exp(nll_sum / n_tokens)
    word PPL       = exp(nll_sum / n_words)          n_words = whitespace-separated words of `text`
    bits per byte  = nll_sum / ln 2 / n_bytes        n_bytes = UTF-8 bytes of `text`

Word PPL and bits per byte do not depend on the tokenizer, so models with different tokenizers
compare on them (as lm-evaluation-harness reports them). nll_sum is summed exactly per token in
float64; the guide's own loop multiplies each window's mean loss by a token count that is one too
small for every window after the first (the label shift), which this does not copy.

Speed: windows of equal length run `batch_size` at a time, and only the positions that are scored
are projected onto the vocabulary (``model(ids, logits_to_keep=k)``, which every model takes; with
stride 512 in a 2048 context that is a quarter of them; the LM head is half the work of a
Pythia-70m-sized model). Every window starts from an empty memory: a model's held memory is set
aside during the evaluation and put back afterwards (``model.memory_aside(train=False)``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from newllm.errors import NewLLMError

#: a token perplexity below this on natural text is a bug until shown otherwise (seed lesson)
SUSPICIOUS_PPL = 5.0


@dataclass
class PerplexityResult:
    nll_sum: float  # total negative log-likelihood of the scored tokens, nats
    n_tokens: int  # tokens scored
    token_ppl: float
    n_words: int | None = None
    n_bytes: int | None = None
    word_ppl: float | None = None
    bits_per_byte: float | None = None
    n_windows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def window_plan(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window, in token positions of the text (see module doc)."""
    plan, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + context, n)
        plan.append((begin, end, max(prev_end, begin + 1)))
        if end == n:
            return plan
        prev_end = end
        begin += stride


def _shape(window: tuple[int, int, int]) -> tuple[int, int]:
    begin, end, first_scored = window
    return end - begin, end - first_scored  # (tokens in the window, tokens scored)


def _as_ids(token_ids) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.detach().cpu()
    else:
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64))
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise NewLLMError(f"sliding_window_perplexity: token_ids must be 1-D (one text), got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex():
        raise NewLLMError(f"sliding_window_perplexity: token_ids must be integers, got {ids.dtype}")
    return ids.long()


def _check(model, ids: torch.Tensor, context: int, stride: int, batch_size: int) -> None:
    if stride <= 0:
        raise NewLLMError(f"sliding_window_perplexity: stride must be > 0, got {stride}")
    if context < 2:
        raise NewLLMError(f"sliding_window_perplexity: context must be >= 2 (a window of one token predicts "
                          f"nothing), got {context}")
    if stride > context:
        raise NewLLMError(f"sliding_window_perplexity: stride {stride} > context {context} would leave tokens unscored")
    if batch_size <= 0:
        raise NewLLMError(f"sliding_window_perplexity: batch_size must be > 0, got {batch_size}")
    if ids.numel() == 0:
        raise NewLLMError("sliding_window_perplexity: empty token list")
    if ids.numel() < 2:
        raise NewLLMError(f"sliding_window_perplexity: text has {ids.numel()} token; at least 2 are needed "
                          "(the first token is never scored)")
    max_pos, vocab = model.config.max_position_embeddings, model.config.vocab_size  # max_pos None: no limit
    if max_pos is not None and context > max_pos:
        raise NewLLMError(f"sliding_window_perplexity: context {context} is longer than the model supports "
                          f"(max_position_embeddings={max_pos})")
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise NewLLMError(f"sliding_window_perplexity: token id {int(ids[pos])} at position {pos} is outside "
                          f"the vocabulary [0, {vocab})")


def _exp(x: float) -> float:
    """exp that gives inf (not OverflowError) past float range and passes NaN through."""
    return math.exp(x) if x < 709.0 or math.isnan(x) else math.inf


@torch.inference_mode()
def sliding_window_perplexity(model, token_ids, context: int = 2048, stride: int = 512, batch_size: int = 8,
                              text: str | None = None, progress: bool = True, forward=None) -> PerplexityResult:
    """Perplexity of one token stream under `model` (a `TransformerLM` or anything with its
    ``model(ids, logits_to_keep=k).logits`` (B, k, V) and ``model.memory_aside(train=False)``).

    token_ids: 1-D ints (list, numpy array, tensor). text: the original text, for word PPL and bits
    per byte. forward: what computes the logits, called as `model` would be (default `model` itself;
    the Trainer passes ``torch.compile(model)`` under `compile: true`); `model` still gives the
    config, the device and the memory handling, and the token ids are range-checked here first.
    Warns when token PPL < 5 (a data leak or a broken causal mask until shown otherwise).
    """
    from tqdm.auto import tqdm

    ids = _as_ids(token_ids)
    _check(model, ids, context, stride, batch_size)
    n_words = n_bytes = None
    if text is not None:
        n_words, n_bytes = len(text.split()), len(text.encode("utf-8"))
        if n_words == 0:
            raise NewLLMError("sliding_window_perplexity: text= has no words (empty or whitespace only)")
    plan = window_plan(ids.numel(), context, stride)
    # consecutive windows of equal length and equal number of scored tokens share a batch: the first
    # window (scores all its tokens) and the last (may be short) run alone, the rest `batch_size` at a time
    batches, cur = [], []
    for w in plan:
        if cur and (len(cur) == batch_size or _shape(w) != _shape(cur[0])):
            batches.append(cur)
            cur = []
        cur.append(w)
    batches.append(cur)

    forward = model if forward is None else forward
    p = next(model.parameters(), None)
    device = torch.device("cpu") if p is None else p.device
    nll_sum, n_tokens = 0.0, 0
    bar = tqdm(total=len(plan), disable=None if progress else True, unit="win", desc="perplexity")
    try:
        with model.memory_aside(train=False):
            for batch in batches:
                length = batch[0][1] - batch[0][0]
                x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # (B, T)
                # logits at window position j predict token j+1: scoring from s needs positions s-1-begin..T-2,
                # the last `keep` positions (all of them in the first window, which scores all but token 0)
                keep = _shape(batch[0])[1] + 1
                logits = forward(x, logits_to_keep=keep).logits  # (B, keep, V)
                offset = length - keep
                for row, (b, e, s) in enumerate(batch):
                    pred = logits[row, s - 1 - b - offset:e - 1 - b - offset].float()  # (n_scored, V)
                    target = x[row, s - b:e - b]
                    nll = F.cross_entropy(pred, target, reduction="none")
                    nll_sum += float(nll.double().sum())
                    n_tokens += target.numel()
                bar.update(len(batch))
    finally:
        bar.close()

    if not math.isfinite(nll_sum):
        warnings.warn(f"perplexity is not finite: the summed loss over {n_tokens} tokens is {nll_sum} (the model "
                      "has NaN/Inf weights, or its activations overflowed)", RuntimeWarning, stacklevel=2)
    token_ppl = _exp(nll_sum / n_tokens)
    result = PerplexityResult(nll_sum=nll_sum, n_tokens=n_tokens, token_ppl=token_ppl, n_windows=len(plan))
    if text is not None:
        result.n_words, result.n_bytes = n_words, n_bytes
        result.word_ppl = _exp(nll_sum / n_words)
        result.bits_per_byte = nll_sum / math.log(2) / n_bytes
    if token_ppl < SUSPICIOUS_PPL:
        warnings.warn(f"token perplexity {token_ppl:.3f} < {SUSPICIOUS_PPL:g}: on natural text this means a data "
                      "leak (evaluating on training text) or a broken causal mask until shown otherwise",
                      stacklevel=2)
    return result
