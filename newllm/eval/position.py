"""Loss by position on long real documents, past a model's receptive field, with and without its memory.

`long_documents` takes the first P tokens of the documents of a token stream that are at least that
long (the Gutenberg books: one document per book). `document_losses` reads each one from an empty
state in pieces of `chunk` tokens with the state carried (equal to one call by the layer contract,
with bounded memory) and returns the loss at every position. `loss_beyond` averages each document's
loss over the positions >= `start` (choose start > `model.receptive_field`: there a part of the
document is out of the reach of attention and comes back only through a memory), runs the same
documents with the memory switched off (`newllm.eval.ablation`), and reports the mean over
documents with a bootstrap confidence interval (documents resampled with replacement, seeded):
the loss with memory, without, and the gain (off - on) per document, paired.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from newllm.errors import NewLLMError
from newllm.eval.ablation import has_memory, memory_switched_off


def long_documents(tokens: np.ndarray, sep: int, length: int, limit: int) -> list[np.ndarray]:
    """The first `length` tokens of up to `limit` documents (separator-delimited) at least that long."""
    arr = np.asarray(tokens)
    cuts = np.flatnonzero(arr == sep)
    starts, ends = np.concatenate(([0], cuts + 1)), np.concatenate((cuts, [len(arr)]))
    out = [arr[a:a + length] for a, b in zip(starts, ends) if b - a >= length]
    return out[:limit]


@torch.no_grad()
def document_losses(model, docs: list[np.ndarray], chunk: int | None = None) -> np.ndarray:
    """(n_docs, P - 1) float64: the loss at position t (predicting token t + 1) of each document, read
    from an empty state, in pieces of `chunk` tokens with the state carried (None: one call)."""
    if not docs:
        raise NewLLMError("document_losses: no documents")
    if chunk is not None and chunk < 1:
        raise NewLLMError(f"document_losses: chunk must be >= 1, got {chunk}")
    device = next(model.parameters()).device
    rows = []
    with model.memory_aside(train=False):
        for doc in docs:
            ids = torch.as_tensor(np.asarray(doc).astype(np.int64), device=device)[None]
            step = chunk or ids.shape[1]
            state, logits = None, []
            for a in range(0, ids.shape[1], step):
                out = model(ids[:, a:a + step], state=state)
                state = out.state
                logits.append(out.logits[0].float())
            logits = torch.cat(logits)
            rows.append(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").double().cpu().numpy())
    return np.stack(rows)


def bootstrap_ci(values: np.ndarray, confidence: float, resamples: int,
                 seed: int) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, seeded);
    (None, None) for fewer than 2 values (no interval from one document)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def loss_beyond(model, docs: list[np.ndarray], start: int, chunk: int | None = None, confidence: float = 0.95,
                resamples: int = 1000, seed: int = 0) -> dict:
    """Mean loss per document over positions >= `start`, with the memory and (for models with one)
    without; means over documents with bootstrap intervals (module doc). Also the per-position curves."""
    if not 0.0 < confidence < 1.0:
        raise NewLLMError(f"loss_beyond: confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise NewLLMError(f"loss_beyond: resamples must be >= 1, got {resamples}")
    length = min(len(d) for d in docs) if docs else 0
    if not 0 <= start < length - 1:
        raise NewLLMError(f"loss_beyond: start {start} leaves no scored position in documents of {length} tokens; "
                          "use longer documents or a smaller start")

    def summary(per_doc: np.ndarray) -> dict:
        lo, hi = bootstrap_ci(per_doc, confidence, resamples, seed)
        return {"mean": float(per_doc.mean()), "ci": [lo, hi], "per_doc": [float(v) for v in per_doc]}

    on = document_losses(model, docs, chunk)
    out = {"n_docs": len(docs), "length": int(length), "start": int(start), "chunk": chunk,
           "confidence": confidence, "on": summary(on[:, start:].mean(1)), "curve_on": on.mean(0).tolist()}
    if has_memory(model):
        with memory_switched_off(model):
            off = document_losses(model, docs, chunk)
        out["off"] = summary(off[:, start:].mean(1))
        out["gain"] = summary(off[:, start:].mean(1) - on[:, start:].mean(1))
        out["curve_off"] = off.mean(0).tolist()
    return out
