"""Passkey retrieval (accuracy by prompt length and needle depth) and associative recall.

`passkey_eval` builds the grid of prompts (`newllm.data.passkey.make_passkey_grid`), greedily
generates ``digits + 2`` tokens after each, and scores the text with `score_passkey` (the first run of
digits must be the key). Prompts of equal token length run together, `batch_size` at a time; the model
has no padding mask, so prompts of different lengths never share a batch. A model with a compressive
memory reads the whole prompt in one call, its memory carrying the earlier segments; softmax-attention
layers (Pythia, Llama) see the whole prompt by attention, also past `max_position_embeddings` (RoPE
has no hard limit, but the model was not trained there). Every prompt starts from an empty memory:
a memory the model holds is set aside and put back afterwards, as in the perplexity evaluator.

`passkey_finetune` is the optional short fine-tuning stage of the Infini-attention paper: fresh
passkey prompts (drawn from ``random.Random(f"passkey-finetune:{seed}")``, a string seed, so never
the integer-seeded evaluation grid), loss on the key's tokens only, AdamW.

`recall_eval` / `recall_train`: the associative-recall task of `newllm.data.passkey.make_recall_batch`.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from newllm.data.passkey import make_passkey_grid, make_passkey_sample, make_recall_batch, score_passkey
from newllm.errors import NewLLMError


@dataclass
class PasskeyResult:
    """accuracy[i][j]: fraction right at lengths[i], depths[j]; samples: one dict per prompt
    (length, depth, passkey, generated text, correct, tokens = the prompt's actual length)."""
    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]
    n_per_cell: int
    samples: list[dict] = field(default_factory=list)

    @property
    def overall(self) -> float:
        """Mean accuracy over all cells (= over all prompts, every cell having n_per_cell)."""
        cells = [a for row in self.accuracy for a in row]
        return sum(cells) / len(cells)

    def to_dict(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "accuracy": self.accuracy,
                "n_per_cell": self.n_per_cell, "overall": self.overall, "samples": self.samples}


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@contextmanager
def _fresh_memory(model, train: bool):
    """Run with an empty held memory and the given train/eval mode; restore both afterwards."""
    was_training = getattr(model, "training", False)
    held = model.get_memory_state() if hasattr(model, "get_memory_state") else None
    if held is not None:
        model.reset_memory()
    if hasattr(model, "train"):
        model.train(train)
    try:
        yield
    finally:
        if held is not None:
            model.set_memory_state(held)
        if hasattr(model, "train"):
            model.train(was_training)


def passkey_eval(model, tokenizer, lengths: list[int], depths: list[float], n_per_cell: int = 5, seed: int = 0,
                 digits: int = 5, batch_size: int = 1, progress: bool = False) -> PasskeyResult:
    """Passkey accuracy for every (length, depth): greedy ``model.generate(ids, max_new_tokens=digits + 2)``."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise NewLLMError(f"passkey_eval: batch_size must be >= 1, got {batch_size}")
    if len(set(lengths)) != len(lengths) or len(set(depths)) != len(depths):
        raise NewLLMError(f"passkey_eval: repeated length or depth in {list(lengths)} / {list(depths)}")
    samples = make_passkey_grid(tokenizer, lengths, depths, n_per_cell, seed, digits)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_len.setdefault(len(s.ids), []).append(i)
    batches = [idx[k:k + batch_size] for idx in by_len.values() for k in range(0, len(idx), batch_size)]
    texts: list[str] = [""] * len(samples)
    device = _device(model)
    with _fresh_memory(model, train=False), torch.no_grad():
        for batch in tqdm(batches, disable=not progress, desc="passkey", unit="batch"):
            x = torch.tensor([samples[i].ids for i in batch], dtype=torch.long, device=device)
            out = model.generate(x, max_new_tokens=digits + 2)
            for row, i in enumerate(batch):
                texts[i] = tokenizer.decode(out[row, x.shape[1]:].tolist())
    records, right = [], {}
    for s, text in zip(samples, texts):
        ok = score_passkey(text, s.passkey)
        right[(s.length, s.depth)] = right.get((s.length, s.depth), 0) + ok
        records.append({"length": s.length, "depth": s.depth, "tokens": len(s.ids), "passkey": s.passkey,
                        "generated": text, "correct": ok})
    acc = [[right[(L, float(d))] / n_per_cell for d in depths] for L in lengths]
    return PasskeyResult(list(lengths), [float(d) for d in depths], acc, n_per_cell, records)


def _step(model, opt, ids: torch.Tensor, labels: torch.Tensor, max_grad_norm: float) -> float:
    loss = model(ids, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return float(loss.detach())


def passkey_finetune(model, tokenizer, steps: int, lengths: list[int], lr: float = 1e-4, batch_size: int = 4,
                     seed: int = 0, digits: int = 5, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                     progress: bool = False) -> list[float]:
    """Fine-tune on fresh passkey prompts; returns the loss of every step.

    Each step draws one length from `lengths` and `batch_size` prompts at uniform random depths; each row
    is prompt + the key's tokens (" N"), loss only on those tokens. Rows whose key tokenizes to fewer
    tokens are right-padded with label -100 (harmless for a causal model: padding comes after
    everything scored). AdamW(lr, weight_decay); gradients clipped to `max_grad_norm` (0: no clipping).
    """
    from tqdm.auto import tqdm

    if steps < 0 or batch_size < 1 or not lengths:
        raise NewLLMError(f"passkey_finetune: need steps >= 0, batch_size >= 1 and lengths, got "
                          f"{steps}, {batch_size}, {lengths}")
    rng = random.Random(f"passkey-finetune:{seed}")
    device = _device(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    pad = getattr(tokenizer, "eos_token_id", None) or 0
    losses = []
    with _fresh_memory(model, train=True):
        for _ in tqdm(range(steps), disable=not progress, desc="passkey finetune", unit="step"):
            length = rng.choice(list(lengths))
            rows = []
            for _ in range(batch_size):
                s = make_passkey_sample(tokenizer, length, rng.random(), rng, digits)
                rows.append((s.ids, tokenizer.encode(f" {s.passkey}")))
            T = max(len(p) + len(a) for p, a in rows)
            ids = torch.full((batch_size, T), pad, dtype=torch.long)
            labels = torch.full((batch_size, T), -100, dtype=torch.long)
            for r, (p, a) in enumerate(rows):
                ids[r, :len(p) + len(a)] = torch.tensor(p + a)
                labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
            losses.append(_step(model, opt, ids.to(device), labels.to(device), max_grad_norm))
    return losses


# ------------------------------------------------------------------------------ associative recall
def recall_eval(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the greedy prediction at the labelled positions (label of t predicted at t - 1),
    from an empty memory, in one forward call over the whole sequence."""
    mask = labels[:, 1:] != -100
    if not bool(mask.any()):
        raise NewLLMError("recall_eval: no labelled positions (every label is -100)")
    device = _device(model)
    with _fresh_memory(model, train=False), torch.no_grad():
        pred = model(ids.to(device)).logits[:, :-1].argmax(-1).cpu()
    return float((pred[mask] == labels[:, 1:][mask]).float().mean())


def recall_train(model, steps: int, n_pairs: int = 4, segment_length: int = 9, batch: int = 64, lr: float = 3e-3,
                 seed: int = 0, weight_decay: float = 0.0, max_grad_norm: float = 1.0, progress: bool = False,
                 **batch_kwargs) -> list[float]:
    """Train on fresh `make_recall_batch` batches (`batch_kwargs`: n_segments_gap, n_keys, n_values,
    tokenizer, vocab); returns the loss of every step. Defaults: the tiny setting of
    tests/layers/test_memory_recall.py (4 pairs, segments of 9, batch 64, lr 3e-3)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    device = _device(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    with _fresh_memory(model, train=True):
        for _ in tqdm(range(steps), disable=not progress, desc="recall", unit="step"):
            ids, labels = make_recall_batch(n_pairs, segment_length, batch, g, **batch_kwargs)
            losses.append(_step(model, opt, ids.to(device), labels.to(device), max_grad_norm))
    return losses


def plot_passkey_heatmap(result: PasskeyResult, path, title: str = "passkey retrieval") -> None:
    """Heat map of accuracy (0..1), length on y, depth on x, each cell annotated; saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(result.depths) + 2, 0.6 * len(result.lengths) + 1.5))
    im = ax.imshow(result.accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result.depths)), [f"{d:g}" for d in result.depths])
    ax.set_yticks(range(len(result.lengths)), [str(L) for L in result.lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("prompt length (tokens)")
    for i, row in enumerate(result.accuracy):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=9)
    ax.set_title(f"{title} (overall {result.overall:.2f})")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
