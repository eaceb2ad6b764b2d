"""What the experiment measures besides the named evaluations: loss by token position, the memory
gates, the memory-state size and inference speed. All on real text, the model in eval mode.

Loss by position answers "does the memory help later tokens?": each long document's first P tokens
are read in ONE call from an empty state, and the loss at position t (predicting token t+1 from
tokens 0..t) is averaged over documents. A model whose memory carries useful context has a curve
that keeps falling at positions its local attention no longer reaches; for models with a memory
layer the same documents are read again with the memory switched off (`memory_switched_off`), and
the difference is what the memory contributes at each position.

Gates: every layer with `gate_values()` reports sigmoid(beta) per head (the weight of the memory
read-out against local attention). A HierarchicalLayer also has a per-token expansion gate e (how
much of the fine read-out is mixed in); its values over the position documents are collected with a
forward hook on `layer.expansion` and summarised as a histogram and quantiles.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

HIST_BINS = 20  # histogram bins of per-token gate values over [0, 1]


def long_documents(tokens: np.ndarray, sep: int, length: int, limit: int) -> list[np.ndarray]:
    """The first `length` tokens of up to `limit` documents (separator-delimited) at least that long."""
    arr = np.asarray(tokens)
    cuts = np.flatnonzero(arr == sep)
    starts, ends = np.concatenate(([0], cuts + 1)), np.concatenate((cuts, [len(arr)]))
    out = [arr[a:a + length] for a, b in zip(starts, ends) if b - a >= length]
    return out[:limit]


@contextlib.contextmanager
def record_token_gates(model):
    """Collect per-token expansion-gate values of every layer that has one: {layer index: [tensors]}."""
    found: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(getattr(model, "layers", [])):
        lin = getattr(layer, "expansion", None)
        if isinstance(lin, torch.nn.Module) and callable(getattr(layer, "expansion_gate", None)):
            found[i] = []
            handles.append(lin.register_forward_hook(
                lambda _m, _i, out, i=i: found[i].append(torch.sigmoid(out.detach().float()).flatten().cpu())))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def gate_summary(model, token_gates: dict[int, list[torch.Tensor]]) -> dict[str, dict]:
    """Per memory layer: its type, sigmoid(beta) per head, and per-token gate statistics if any."""
    out = {}
    for i, layer in enumerate(getattr(model, "layers", [])):
        fn = getattr(layer, "gate_values", None)
        if not callable(fn):
            continue
        entry = {"type": type(layer).__name__, "head_gate": [round(float(g), 6) for g in fn().flatten()]}
        vals = torch.cat(token_gates[i]) if token_gates.get(i) else None
        if vals is not None and vals.numel():
            q = torch.quantile(vals[:1_000_000], torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
            counts = torch.histc(vals, bins=HIST_BINS, min=0.0, max=1.0).long().tolist()
            entry["token_gate"] = {"name": "expansion", "mean": float(vals.mean()), "std": float(vals.std()),
                                   "quantiles": dict(zip(("p05", "p25", "p50", "p75", "p95"), q)),
                                   "hist": counts, "n": int(vals.numel())}
        out[f"L{i}"] = entry
    return out


@contextlib.contextmanager
def memory_switched_off(model):
    """Every compressive-memory layer with `use_memory=False` (no read, no write) inside the block.

    The ablation that shows what the memory contributes: the same weights, the memory read-out set
    to zero. That is what every layer reads during its first segment anyway (an empty memory reads
    as 0), so the ablated model stays on ground it was trained on."""
    layers = [layer for layer in getattr(model, "layers", []) if getattr(layer, "has_compressive_memory", False)]
    before = [layer.config.use_memory for layer in layers]
    try:
        for layer in layers:
            layer.config.use_memory = False
        yield len(layers)
    finally:
        for layer, b in zip(layers, before):
            layer.config.use_memory = b


@torch.no_grad()
def loss_by_position(model, docs: list[np.ndarray], bins: int, progress: bool = False) -> dict:
    """Mean loss at each position over `docs` (equal lengths), each read in one call from an empty
    state; also the gates seen meanwhile and the state size after the first document."""
    from tqdm import tqdm

    if not docs:
        return {"n_docs": 0}
    device = next(model.parameters()).device
    model.eval()
    held = getattr(model, "_memory", None)
    model.reset_memory()
    total, off, state_bytes = 0.0, None, None
    try:
        with record_token_gates(model) as token_gates:
            for doc in tqdm(docs, desc="loss by position", disable=not progress, leave=False):
                ids = torch.as_tensor(doc.astype(np.int64), device=device)[None]
                res = model(ids)
                total = total + _nll(res.logits, ids)
                if state_bytes is None:
                    state_bytes = [int(b) for b in model.memory_size_bytes(res.state)]
        gates = gate_summary(model, token_gates)
        with memory_switched_off(model) as n_memory_layers:
            if n_memory_layers:
                off = 0.0
                for doc in docs:
                    ids = torch.as_tensor(doc.astype(np.int64), device=device)[None]
                    off = off + _nll(model(ids).logits, ids)
    finally:
        model.set_memory_state(held)
    mean = total / len(docs)
    edges = np.linspace(0, len(mean), bins + 1).round().astype(int)

    def binned(v):
        return [float(v[a:b].mean()) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    out = {"n_docs": len(docs), "length": int(len(docs[0])), "loss": [float(v) for v in mean],
           "bin_edges": edges.tolist(), "bin_loss": binned(mean), "gates": gates,
           "state_bytes": {"per_entry": state_bytes, "total": int(sum(state_bytes)),
                           "after_tokens": int(len(docs[0]))}}
    if off is not None:  # the same documents with the memory switched off
        off = off / len(docs)
        out["loss_memory_off"] = [float(v) for v in off]
        out["bin_loss_memory_off"] = binned(off)
        out["segment_length"] = min(layer.config.segment_length for layer in model.layers
                                    if getattr(layer, "has_compressive_memory", False))
    return out


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """Per-position loss of one row: position t predicts token t + 1."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none").double().cpu().numpy()


@torch.no_grad()
def inference_speed(model, tokens: np.ndarray, context: int, batch_size: int, repeats: int) -> dict:
    """Forward tokens/s on `batch_size` real windows of `context` tokens (median of `repeats` timed
    passes after one warm-up), all positions projected onto the vocabulary."""
    device = next(model.parameters()).device
    n = min(batch_size, max(1, len(tokens) // context))
    ids = torch.as_tensor(np.asarray(tokens[:n * context]).astype(np.int64), device=device).view(n, -1)
    model.eval()
    held = getattr(model, "_memory", None)
    model.reset_memory()
    times = []
    try:
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    finally:
        model.set_memory_state(held)
    sec = statistics.median(times)
    return {"tokens_per_s": ids.numel() / sec, "batch": n, "context": ids.shape[1], "seconds": sec}
