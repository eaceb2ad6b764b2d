"""Short fine-tunes: one loop (`finetune`) and the three tasks that use it.

`finetune(model, batches, steps, lr)` runs `steps` AdamW steps on the batches a caller draws, one
``(input_ids, labels)`` pair per step (labels -100 where nothing is scored; the model shifts them:
position t's label is predicted from positions < t), and returns the loss of every step. The caller
owns the data and its seed, so a seed gives the same batches in the same order; the loop owns the
rest, the same for every fine-tune:

* optimizer groups from `newllm.train.optim.build_param_groups`, as in training: weight matrices get
  `weight_decay`, biases, norms and embeddings none, and each group a layer requests (the memory
  gates: Infini's beta, the routing and expansion gates) gets the lr of its entry in `param_groups`
  (``{"gates": {"lr": 1e-2}}``), else the base `lr` and no decay. A gate is a few scalars that
  AdamW moves by about lr per step, so a short fine-tune at the base lr leaves it where it was. A
  group no layer of the model requests (gates for Pythia) is an error;
* the held memory is set aside (``model.memory_aside(train=True)``): every batch starts from an
  empty memory, and the memory the model held is back afterwards;
* gradients are clipped to `max_grad_norm` (0: no clipping);
* the model is left in eval mode (what every caller evaluates next).

No learning-rate schedule: these fine-tunes are a few hundred steps at a constant lr.

The tasks (each evaluated in `newllm.eval`; the evaluations never depend on how a model was trained):

* `passkey_finetune`: fresh passkey prompts, loss on the key's tokens only (the Infini-attention
  paper's fine-tuning stage before its passkey test); `passkey_distance_finetune`: the same with the
  needle a chosen number of tokens before the answer (the memory test);
* `recall_train`: fresh associative-recall batches (`newllm.data.recall.make_recall_batch`);
* `finetune_on_texts`: language modelling on a few texts (the Reversal Curse facts).
"""
from __future__ import annotations

import math

import random
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from newllm.data.corpora import separator_id
from newllm.data.passkey import make_passkey_at_distance, make_passkey_sample
from newllm.data.recall import make_recall_batch
from newllm.errors import NewLLMError
from newllm.train.optim import build_param_groups

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), each (B, T)


def finetune(model: nn.Module, batches: Iterable[Batch], steps: int, lr: float, *,
             param_groups: dict[str, dict[str, float]] | None = None, weight_decay: float = 0.0,
             max_grad_norm: float = 1.0, progress: bool = False, desc: str = "fine-tune") -> list[float]:
    """Train `model` for `steps` steps on `batches` (each (input_ids, labels), on any device: they are
    moved to the model's); returns the loss of every step. See the module doc."""
    from tqdm.auto import tqdm

    if steps < 0 or not 0 < lr < math.inf or weight_decay < 0 or max_grad_norm < 0:
        raise NewLLMError(f"{desc}: need steps >= 0, lr > 0, weight_decay >= 0 and max_grad_norm >= 0; got "
                          f"steps={steps}, lr={lr}, weight_decay={weight_decay}, max_grad_norm={max_grad_norm}")
    opt = torch.optim.AdamW(build_param_groups(model, lr, weight_decay, param_groups or {}), lr=lr)
    device = next(model.parameters()).device
    it = iter(batches)
    losses: list[float] = []
    with model.memory_aside(train=True):
        for step in tqdm(range(steps), disable=None if progress else True, desc=desc, unit="step"):
            try:
                ids, labels = next(it)
            except StopIteration:
                raise NewLLMError(f"{desc}: the batches ran out after {step} of {steps} steps") from None
            loss = model(ids.to(device), labels=labels.to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


# ------------------------------------------------------------------------------ passkey
def _passkey_batches(tokenizer, choices: list, make, batch_size: int, rng: random.Random) -> Iterator[Batch]:
    """Batches of `batch_size` prompts + answers, one `rng.choice(choices)` per batch and
    `make(choice, rng)` per row (a PasskeySample); loss only on the answer's tokens."""
    pad = tokenizer.eos_token_id or 0  # any id: padding is never scored
    while True:
        choice = rng.choice(list(choices))
        rows = []
        for _ in range(batch_size):
            s = make(choice, rng)
            rows.append((s.ids, tokenizer.encode(f" {s.passkey}")))
        T = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((batch_size, T), pad, dtype=torch.long)
        labels = torch.full((batch_size, T), -100, dtype=torch.long)
        for r, (p, a) in enumerate(rows):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p):len(p) + len(a)] = torch.tensor(a)
        yield ids, labels


def passkey_finetune(model, tokenizer, steps: int, lengths: list[int], lr: float = 1e-4, batch_size: int = 4,
                     seed: int = 0, digits: int = 5, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                     progress: bool = False, param_groups: dict[str, dict[str, float]] | None = None) -> list[float]:
    """Fine-tune on fresh passkey prompts; returns the loss of every step.

    The prompts come from ``random.Random(f"passkey-finetune:{seed}")`` (a string seed, so never the
    integer-seeded evaluation grid of `newllm.eval.passkey.passkey_eval`). Each step draws one length
    from `lengths` and `batch_size` prompts at uniform random depths; each row is prompt + the key's
    tokens (" N"), loss only on those tokens. Rows whose key tokenizes to fewer tokens are
    right-padded with label -100 (harmless for a causal model: padding comes after everything
    scored). The steps are `finetune`'s (`param_groups`, e.g. ``{"gates": {"lr": 1e-2}}``).
    """
    if steps < 0 or batch_size < 1 or not lengths:
        raise NewLLMError(f"passkey_finetune: need steps >= 0, batch_size >= 1 and lengths, got "
                          f"{steps}, {batch_size}, {lengths}")
    rng = random.Random(f"passkey-finetune:{seed}")
    make = lambda length, r: make_passkey_sample(tokenizer, length, r.random(), r, digits)  # noqa: E731
    return finetune(model, _passkey_batches(tokenizer, lengths, make, batch_size, rng), steps, lr,
                    param_groups=param_groups, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                    progress=progress, desc="passkey fine-tune")


def passkey_distance_finetune(model, tokenizer, steps: int, distances: list[int], lr: float = 1e-4,
                              batch_size: int = 4, seed: int = 0, digits: int = 5, lead: int = 0,
                              weight_decay: float = 0.0, max_grad_norm: float = 1.0, progress: bool = False,
                              param_groups: dict[str, dict[str, float]] | None = None) -> list[float]:
    """Fine-tune on fresh passkey prompts whose needle ends `distance` tokens before the answer
    (`make_passkey_at_distance`; one distance drawn from `distances` per step), from
    ``random.Random(f"passkey-distance-finetune:{seed}")``; loss on the key's tokens only. Train at
    short distances past the receptive field, test at longer ones (`passkey_distance_eval`)."""
    if steps < 0 or batch_size < 1 or not distances:
        raise NewLLMError(f"passkey_distance_finetune: need steps >= 0, batch_size >= 1 and distances, got "
                          f"{steps}, {batch_size}, {distances}")
    rng = random.Random(f"passkey-distance-finetune:{seed}")
    make = lambda d, r: make_passkey_at_distance(tokenizer, d, r, digits, lead)  # noqa: E731
    return finetune(model, _passkey_batches(tokenizer, distances, make, batch_size, rng), steps, lr,
                    param_groups=param_groups, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                    progress=progress, desc="passkey fine-tune")


# ------------------------------------------------------------------------------ associative recall
def recall_train(model, steps: int, n_pairs: int = 4, segment_length: int = 9, batch: int = 64, lr: float = 3e-3,
                 seed: int = 0, weight_decay: float = 0.0, max_grad_norm: float = 1.0, progress: bool = False,
                 param_groups: dict[str, dict[str, float]] | None = None, **batch_kwargs) -> list[float]:
    """Train on fresh `make_recall_batch` batches drawn from ``torch.Generator().manual_seed(seed)``
    (`batch_kwargs`: n_segments_gap, n_keys, n_values, tokenizer, vocab); returns the loss of every
    step. Defaults: the tiny setting of tests/layers/test_memory_recall.py (4 pairs, segments of 9,
    batch 64, lr 3e-3). The steps are `finetune`'s (`param_groups`, e.g. ``{"gates": {"lr": 1e-2}}``);
    `newllm.eval.recall.recall_eval` scores the result."""
    g = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[Batch]:
        while True:
            yield make_recall_batch(n_pairs, segment_length, batch, g, **batch_kwargs)

    return finetune(model, batches(), steps, lr, param_groups=param_groups, weight_decay=weight_decay,
                    max_grad_norm=max_grad_norm, progress=progress, desc="recall")


# ------------------------------------------------------------------------------ texts (Reversal Curse facts)
def finetune_on_texts(model, tokenizer, texts: list[str], steps: int, lr: float = 1e-4, batch_size: int = 8,
                      seq_len: int = 128, seed: int = 0, progress: bool = False, weight_decay: float = 0.0,
                      max_grad_norm: float = 1.0, param_groups: dict[str, dict[str, float]] | None = None
                      ) -> list[float]:
    """Train `model` on `texts` for `steps` steps; returns the loss of each step.

    The texts are shuffled (seeded), each preceded by the separator token and joined into one stream
    (never padded). A batch is `batch_size` windows of `seq_len` tokens at random offsets (seeded), so
    a sentence cut at one window's edge is whole in another; a stream shorter than a window is one
    window of its own length. The steps are `finetune`'s (`param_groups`, e.g.
    ``{"gates": {"lr": 1e-2}}``); `newllm.eval.reversal.reversal_eval` scores the result.
    """
    if steps < 0 or not 0 < lr < math.inf or batch_size < 1 or seq_len < 2:
        raise NewLLMError(f"finetune_on_texts: need steps >= 0, lr > 0, batch_size >= 1, seq_len >= 2; got "
                          f"steps={steps}, lr={lr}, batch_size={batch_size}, seq_len={seq_len}")
    if not texts:
        raise NewLLMError("finetune_on_texts: no training texts")
    gen = torch.Generator().manual_seed(seed)
    sep = separator_id(tokenizer)
    stream = []
    for i in torch.randperm(len(texts), generator=gen).tolist():
        stream += [sep, *tokenizer.encode(texts[i])]
    stream = torch.tensor(stream)
    width = min(seq_len, len(stream))

    def windows() -> Iterator[Batch]:
        while True:
            offsets = torch.randint(0, len(stream) - width + 1, (batch_size,), generator=gen)
            x = torch.stack([stream[o:o + width] for o in offsets.tolist()])
            yield x, x  # labels = inputs: the model shifts them

    return finetune(model, windows(), steps, lr, param_groups=param_groups, weight_decay=weight_decay,
                    max_grad_norm=max_grad_norm, progress=progress, desc="fine-tune")
