"""Associative recall, a synthetic task for small models trained from scratch.

Key-value pairs in the first segment, the same keys queried (in a new order) at least one segment
boundary later, so only a model that carries information across segments (a memory, or attention
reaching that far) answers above chance 1 / n_values. See `make_recall_batch` for the layout and
`recall_vocab` for the token ids (plain ids, or real one-token words of a tokenizer). Training on it
and scoring it: `newllm.eval.recall`.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from newllm.errors import NewLLMError

#: real words used as recall keys when a tokenizer is given (each must be one token with a leading space)
RECALL_KEY_WORDS = ("apple", "river", "house", "green", "table", "music", "water", "stone", "cloud", "horse",
                    "paper", "light", "bread", "chair", "glass", "money", "night", "plant", "sugar", "train",
                    "world", "dream", "field", "heart", "metal", "ocean", "point", "sound", "storm", "voice",
                    "woman", "youth")
#: the filler word between the pairs and the queries
RECALL_FILLER_WORD = " the"


@dataclass
class RecallVocab:
    """Token ids of the recall task: keys, values (the answers) and one filler token."""
    keys: list[int]
    values: list[int]
    filler: int


def recall_vocab(tokenizer=None, n_keys: int = 16, n_values: int = 16) -> RecallVocab:
    """Ids for the recall task. Without a tokenizer: keys 1..n_keys, values next, then the filler
    (token 0 unused; vocabulary size n_keys + n_values + 2). With one: keys are single-token common
    words (" apple", ...), values the numbers " 0" .. " n_values-1" (single tokens in GPT-NeoX-style
    vocabularies), the filler " the", so the task runs on any model of that vocabulary; a vocabulary
    without those single tokens (a small BPE) gets single characters instead (keys a-z, values A-Z)."""
    if n_keys < 1 or n_values < 2:
        raise NewLLMError(f"recall: need n_keys >= 1 and n_values >= 2, got {n_keys}, {n_values}")
    if tokenizer is None:
        keys = list(range(1, n_keys + 1))
        values = list(range(n_keys + 1, n_keys + n_values + 1))
        return RecallVocab(keys, values, n_keys + n_values + 1)

    def single(text: str) -> int | None:
        ids = tokenizer.encode(text)
        return ids[0] if len(ids) == 1 else None

    keys = [i for i in (single(" " + w) for w in RECALL_KEY_WORDS) if i is not None][:n_keys]
    values = [single(f" {v}") for v in range(n_values)]
    filler = single(RECALL_FILLER_WORD)
    if len(keys) < n_keys or None in values or filler is None:
        # a small vocabulary (a BPE of a few hundred tokens) lacks whole words: fall back to single
        # characters, which every byte-level vocabulary holds (keys a-z, values A-Z, filler ".")
        keys = [i for i in (single(c) for c in string.ascii_lowercase) if i is not None][:n_keys]
        values = [single(c) for c in string.ascii_uppercase[:n_values]]
        filler = single(".")
        if n_values > 26:
            values.append(None)
    if len(keys) < n_keys or None in values or filler is None:
        raise NewLLMError(f"recall: tokenizer {getattr(tokenizer, 'name', '')!r} lacks single tokens for "
                          f"{n_keys} key words / {n_values} numbers / {RECALL_FILLER_WORD!r}")
    if len(set(keys) | set(values) | {filler}) != n_keys + n_values + 1:
        raise NewLLMError("recall: key, value and filler tokens must all differ")
    return RecallVocab(keys, values, filler)


def recall_distance(n_pairs: int, segment_length: int, n_segments_gap: int) -> int:
    """The fewest positions between a query and the pair it asks for in `make_recall_batch`'s layout:
    the first query's key (which predicts its value) after the last pair's value,
    S * (gap + 1) - 4n + 1. Every pair token is at least this far back from every answer position."""
    return segment_length * (n_segments_gap + 1) - 4 * n_pairs + 1


def recall_gap(distance: int, n_pairs: int, segment_length: int) -> int:
    """The smallest `n_segments_gap` (>= 1) whose `recall_distance` is at least `distance`: pairs beyond
    a receptive field of `distance - 1` tokens."""
    gap = max(1, -(-(distance + 4 * n_pairs - 1) // segment_length) - 1)
    while recall_distance(n_pairs, segment_length, gap) < distance:
        gap += 1
    return gap


def make_recall_batch(n_pairs: int, segment_length: int, batch: int, generator: torch.Generator,
                      n_segments_gap: int = 1, n_keys: int = 16, n_values: int = 16, tokenizer=None,
                      vocab: RecallVocab | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), each (batch, S * (1 + n_segments_gap)), S = segment_length >= 2 * n_pairs + 1:

        segment 0:              k1 v1 ... kn vn  F ... F         n pairs, distinct keys
        segments 1..gap-1:      F ... F                          (only when n_segments_gap > 1)
        segment gap:            F ... F  kp1 vp1 ... kpn vpn     the same keys, new order

    labels are -100 except at the query values, where they equal the value (the model's loss shifts
    labels by one: position t's label is predicted from positions < t). Values are drawn uniformly with
    replacement, so a model that cannot see segment 0 scores 1 / n_values (chance) at best.
    Token ids come from `vocab`, else `recall_vocab(tokenizer, n_keys, n_values)`.
    """
    if vocab is None:
        vocab = recall_vocab(tokenizer, n_keys, n_values)
    n_k, n_v = len(vocab.keys), len(vocab.values)
    if not 1 <= n_pairs <= n_k:
        raise NewLLMError(f"recall: n_pairs must be in [1, {n_k}] (distinct keys), got {n_pairs}")
    if segment_length < 2 * n_pairs + 1:
        raise NewLLMError(f"recall: segment_length {segment_length} < 2 * n_pairs + 1 = {2 * n_pairs + 1}")
    if n_segments_gap < 1 or batch < 1:
        raise NewLLMError(f"recall: n_segments_gap and batch must be >= 1, got {n_segments_gap}, {batch}")
    keys_t, vals_t = torch.tensor(vocab.keys), torch.tensor(vocab.values)
    key_idx = torch.argsort(torch.rand(batch, n_k, generator=generator), 1)[:, :n_pairs]
    keys = keys_t[key_idx]  # (batch, n) distinct per row
    vals = vals_t[torch.randint(0, n_v, (batch, n_pairs), generator=generator)]
    perm = torch.argsort(torch.rand(batch, n_pairs, generator=generator), 1)
    S, pad = segment_length, segment_length - 2 * n_pairs
    ids = torch.full((batch, S * (1 + n_segments_gap)), vocab.filler, dtype=torch.long)
    ids[:, :2 * n_pairs] = torch.stack((keys, vals), 2).flatten(1)
    q0 = S * n_segments_gap + pad  # first query key
    ids[:, q0:] = torch.stack((keys.gather(1, perm), vals.gather(1, perm)), 2).flatten(1)
    labels = torch.full_like(ids, -100)
    labels[:, q0 + 1::2] = ids[:, q0 + 1::2]
    return ids, labels
