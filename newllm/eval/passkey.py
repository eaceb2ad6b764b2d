"""Passkey retrieval: accuracy by prompt length and needle depth (associative recall: `newllm.eval.recall`).

`passkey_eval` builds the grid of prompts (`newllm.data.passkey.make_passkey_grid`), greedily
generates ``digits + 2`` tokens after each, and scores the text with `score_passkey` (the first run of
digits must be the key). Prompts of equal token length run together, `batch_size` at a time; the model
has no padding mask, so prompts of different lengths never share a batch. A model with a compressive
memory reads the whole prompt in one call, its memory carrying the earlier segments; softmax-attention
layers (Pythia, Llama) see the whole prompt by attention, also past `max_position_embeddings` (RoPE
has no hard limit, but the model was not trained there). Every prompt starts from an empty memory:
a memory the model holds is set aside and put back afterwards, as in the perplexity evaluator.

`passkey_distance_eval` is the memory test: the needle ends a chosen number of tokens before the
answer (`newllm.data.passkey.make_passkey_at_distance`); at distances past `model.receptive_field`
only a memory can answer, and the same prompts run again with the memory switched off
(`newllm.eval.ablation`), so the accuracy the memory carried is the difference.

The optional short fine-tune on passkey prompts before the grid (the Infini-attention paper's) is
`newllm.train.finetune.passkey_finetune`: evaluation does not depend on how a model was trained.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from newllm.data.passkey import PasskeySample, make_passkey_at_distance, make_passkey_grid, score_passkey
from newllm.errors import NewLLMError
from newllm.files import atomic_write


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
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def passkey_eval(model, tokenizer, lengths: list[int], depths: list[float], n_per_cell: int = 5, seed: int = 0,
                 digits: int = 5, batch_size: int = 1, progress: bool = False) -> PasskeyResult:
    """Passkey accuracy for every (length, depth): greedy ``model.generate(ids, max_new_tokens=digits + 2)``."""
    if batch_size < 1:
        raise NewLLMError(f"passkey_eval: batch_size must be >= 1, got {batch_size}")
    if len(set(lengths)) != len(lengths) or len(set(depths)) != len(depths):
        raise NewLLMError(f"passkey_eval: repeated length or depth in {list(lengths)} / {list(depths)}")
    samples = make_passkey_grid(tokenizer, lengths, depths, n_per_cell, seed, digits)
    texts = generate_answers(model, tokenizer, samples, digits, batch_size, progress)
    records, right = [], {}
    for s, text in zip(samples, texts):
        ok = score_passkey(text, s.passkey)
        right[(s.length, s.depth)] = right.get((s.length, s.depth), 0) + ok
        records.append({"length": s.length, "depth": s.depth, "tokens": len(s.ids), "passkey": s.passkey,
                        "generated": text, "correct": ok})
    acc = [[right[(L, float(d))] / n_per_cell for d in depths] for L in lengths]
    return PasskeyResult(list(lengths), [float(d) for d in depths], acc, n_per_cell, records)


def generate_answers(model, tokenizer, samples: list[PasskeySample], digits: int, batch_size: int = 1,
                     progress: bool = False) -> list[str]:
    """The decoded greedy continuation (digits + 2 tokens) of every prompt, prompts of equal token
    length batched together, from an empty memory (a held memory is set aside)."""
    from tqdm.auto import tqdm

    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_len.setdefault(len(s.ids), []).append(i)
    batches = [idx[k:k + batch_size] for idx in by_len.values() for k in range(0, len(idx), batch_size)]
    texts: list[str] = [""] * len(samples)
    device = _device(model)
    with model.memory_aside(train=False), torch.no_grad():
        for batch in tqdm(batches, disable=None if progress else True, desc="passkey", unit="batch"):
            x = torch.tensor([samples[i].ids for i in batch], dtype=torch.long, device=device)
            out = model.generate(x, max_new_tokens=digits + 2)
            for row, i in enumerate(batch):
                texts[i] = tokenizer.decode(out[row, x.shape[1]:].tolist())
    return texts


def passkey_distance_eval(model, tokenizer, distances: list[int], n_per_distance: int = 10, seed: int = 0,
                          digits: int = 5, lead: int = 0, batch_size: int = 1, progress: bool = False) -> dict:
    """Accuracy at each distance (needle end -> answer, in tokens), with the memory and, for a model
    with one, without it (same prompts, same weights). Returns a JSON-able dict: distances,
    accuracy (list), accuracy_memory_off (list, or None), receptive_field, samples."""
    from newllm.eval.ablation import has_memory, memory_switched_off

    if batch_size < 1:
        raise NewLLMError(f"passkey_distance_eval: batch_size must be >= 1, got {batch_size}")
    if n_per_distance < 1 or not distances or len(set(distances)) != len(distances):
        raise NewLLMError(f"passkey_distance_eval: need n_per_distance >= 1 and distinct distances, got "
                          f"{n_per_distance}, {list(distances)}")
    rng = random.Random(seed)
    samples = [make_passkey_at_distance(tokenizer, d, rng, digits, lead) for d in distances
               for _ in range(n_per_distance)]

    def accuracy(texts: list[str]) -> tuple[list[float], list[bool]]:
        ok = [score_passkey(t, s.passkey) for t, s in zip(texts, samples)]
        return [sum(ok[i * n_per_distance:(i + 1) * n_per_distance]) / n_per_distance
                for i in range(len(distances))], ok

    on, ok_on = accuracy(generate_answers(model, tokenizer, samples, digits, batch_size, progress))
    off = ok_off = None
    if has_memory(model):
        with memory_switched_off(model):
            off, ok_off = accuracy(generate_answers(model, tokenizer, samples, digits, batch_size, progress))
    records = [{"distance": s.distance, "tokens": len(s.ids), "passkey": s.passkey, "correct": a,
                "correct_memory_off": None if ok_off is None else ok_off[i]}
               for i, (s, a) in enumerate(zip(samples, ok_on))]
    return {"distances": list(distances), "accuracy": on, "accuracy_memory_off": off,
            "n_per_distance": n_per_distance, "lead": lead, "receptive_field": model.receptive_field,
            "overall": sum(on) / len(on), "overall_memory_off": None if off is None else sum(off) / len(off),
            "samples": records}


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png"))
    plt.close(fig)
