"""What the experiment measures besides the named evaluations: loss by token position, the memory
gates, the memory-state size and inference speed. All on real text, the model in eval mode.

Loss by position answers "does the memory help later tokens?": each long document's first P tokens
are read in ONE call from an empty state, and the loss at position t (predicting token t+1 from
tokens 0..t) is averaged over documents. A model whose memory carries useful context has a curve
that keeps falling at positions its local attention no longer reaches; for models with a memory
layer the same documents are read again with the memory switched off (`memory_switched_off`), and
the difference is what the memory contributes at each position.

Gates: every layer reports what it declares (`BaseLayer.gates()`: e.g. sigmoid(beta) per head, the
weight of the memory read-out against local attention) and its per-token gates
(`BaseLayer.token_gates()`: modules whose output is a gate value in [0, 1], e.g. a
HierarchicalLayer's expansion gate e, how much of the fine read-out is mixed in); the per-token
values over the position documents are collected with forward hooks on those modules and
summarised as a histogram and quantiles. Nothing here knows a layer type by name.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from newllm.eval.ablation import memory_switched_off

HIST_BINS = 20  # histogram bins of per-token gate values over [0, 1]


@contextlib.contextmanager
def record_token_gates(model):
    """Collect every layer's declared per-token gates: {layer index: {gate name: [tensors]}}."""
    found: dict[int, dict[str, list[torch.Tensor]]] = {}
    handles = []
    for i, layer in enumerate(model.layers):
        for name, module in layer.token_gates().items():
            values = found.setdefault(i, {}).setdefault(name, [])
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, values=values: values.append(out.detach().float().flatten().cpu())))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def token_gate_stats(vals: torch.Tensor) -> dict:
    q = torch.quantile(vals[:1_000_000], torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
    counts = torch.histc(vals, bins=HIST_BINS, min=0.0, max=1.0).long().tolist()
    return {"mean": float(vals.mean()), "std": float(vals.std()),
            "quantiles": dict(zip(("p05", "p25", "p50", "p75", "p95"), q)), "hist": counts, "n": int(vals.numel())}


def gate_summary(model, token_gates: dict[int, dict[str, list[torch.Tensor]]]) -> dict[str, dict]:
    """Per layer that declares gates: its type, each gate's values (per head), and per-token gate
    statistics where it has per-token gates."""
    out = {}
    for i, layer in enumerate(model.layers):
        gates = layer.gates()
        if not gates and not layer.token_gates():
            continue
        entry = {"type": type(layer).__name__,
                 "gates": {name: [round(float(g), 6) for g in v.flatten()] for name, v in gates.items()},
                 "token_gates": {}}
        for name, parts in token_gates.get(i, {}).items():
            vals = torch.cat(parts) if parts else None
            if vals is not None and vals.numel():
                entry["token_gates"][name] = token_gate_stats(vals)
        out[f"L{i}"] = entry
    return out


@torch.no_grad()
def loss_by_position(model, docs: list[np.ndarray], bins: int, progress: bool = False) -> dict:
    """Mean loss at each position over `docs` (equal lengths), each read in one call from an empty
    state; also the gates seen meanwhile and the state size after the first document."""
    from tqdm import tqdm

    if not docs:
        return {"n_docs": 0}
    device = next(model.parameters()).device
    total, off, state_bytes = 0.0, None, None
    with model.memory_aside(train=False):
        with record_token_gates(model) as token_gates:
            for doc in tqdm(docs, desc="loss by position", disable=None if progress else True, leave=False):
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
        out["segment_length"] = min(layer.memory_segment_length for layer in model.layers
                                    if layer.memory_segment_length is not None)
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
    times = []
    with model.memory_aside(train=False):
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"tokens_per_s": ids.numel() / sec, "batch": n, "context": ids.shape[1], "seconds": sec}
