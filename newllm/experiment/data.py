"""The experiment's training stream: real text with the Reversal-Curse facts mixed in.

The corpus's training split is read as one token stream (documents joined by the separator), cut to
the budget (`samples` windows of `seq_len` tokens), and the facts' training sentences are inserted
as documents of their own at document boundaries chosen by the seed: joined with the separator like
every other document, never padded (seed lesson: EOS padding made 94% of the training tokens EOS).
Every model of an experiment trains on the same stream, in the same order (same seed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from newllm.errors import NewLLMError


@dataclass
class TrainingStream:
    tokens: np.ndarray  # 1-D token ids
    corpus_tokens: int  # of them, tokens from the corpus
    fact_tokens: int  # of them, tokens of fact sentences (separators included)
    fact_documents: int


def mix_documents(corpus: np.ndarray, extra: list[list[int]], sep: int, budget: int | None,
                  seed: int) -> TrainingStream:
    """`corpus` (a separator-joined stream) cut so that corpus + extra documents fit `budget` tokens
    (None: no cut), with each extra document (followed by `sep`) inserted after a separator of the
    corpus chosen uniformly by `seed` (several may land at the same boundary, in their given order)."""
    extra_len = sum(len(d) + 1 for d in extra)
    n_corpus = len(corpus) if budget is None else budget - extra_len
    if n_corpus < 2:
        raise NewLLMError(f"experiment: the training budget ({budget} tokens) does not hold the {len(extra)} fact "
                          f"sentences ({extra_len} tokens); raise samples or lower reversal.n_facts / repeats")
    if n_corpus > len(corpus):
        raise NewLLMError(f"experiment: the budget needs {n_corpus:,} corpus tokens but the training split has "
                          f"{len(corpus):,}; lower samples (or set it to null for the whole split)")
    corpus = np.asarray(corpus[:n_corpus])
    if not extra:
        return TrainingStream(corpus.copy(), len(corpus), 0, 0)
    cuts = np.flatnonzero(corpus == sep) + 1  # positions right after a separator
    cuts = np.concatenate(([0], cuts[cuts < len(corpus)]))
    rng = np.random.default_rng(seed)
    where = np.sort(rng.choice(cuts, size=len(extra), replace=True), kind="stable")
    order = rng.permutation(len(extra))  # documents in a seeded order (paraphrases of a fact spread out)
    pieces, prev = [], 0
    for pos, i in zip(where, order):
        pieces.append(corpus[prev:pos])
        pieces.append(np.asarray([*extra[i], sep], dtype=corpus.dtype))
        prev = pos
    pieces.append(corpus[prev:])
    tokens = np.concatenate(pieces)
    return TrainingStream(tokens, len(corpus), extra_len, len(extra))
