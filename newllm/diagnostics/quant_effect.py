"""The quantisation effect: the same model at several quantisations, all against its float32 weights.

    effect = quantisation_effect("model.Q4_1.gguf", tokens, variants, window=512, workdir="runs/q")

The reference is newllm running the file's weights dequantised to float32. Each variant is a
(name, runner) pair: newllm on requantised weights (`requantize`, gguf's quantiser), newllm on
another GGUF's weights, or llama.cpp on a GGUF file (its runtime: quantised weights *and* its
matmuls' 8-bit activations). Reported per variant: the SQNR of every layer's output on the first
window (a trace), and over all windows the mean KL(reference || variant) of the next-token
distributions, the share of tokens with the same top-1, and the NLL per token of the real next
token. Windows are independent (each starts from an empty cache).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from newllm.checkpoints.gguf import field, open_gguf, read_tensor
from newllm.diagnostics.compare import error_metrics
from newllm.diagnostics.trace import Trace, trace_model
from newllm.errors import NewLLMError
from newllm.models.model import TransformerLM


@dataclass
class Variant:
    name: str
    logits: Callable[[list[list[int]]], Iterator[torch.Tensor]]  # windows -> (T, V) per window
    trace: Callable[[list[int]], Trace]  # the first window's points


def newllm_variant(name: str, model: TransformerLM, points: str) -> Variant:
    def logits(windows):
        with torch.no_grad(), model.memory_aside(train=False):
            for w in tqdm(windows, desc=name, leave=False):
                yield model(torch.tensor([w]), state=model.init_state(1)).logits[0].float()
    return Variant(name, logits, lambda ids: trace_model(model, ids, points, side=name))


def llamacpp_variant(name: str, path, points: str, kv_type: str = "f16", threads: int | None = None) -> Variant:
    from newllm.diagnostics.llamacpp import llamacpp_logits, trace_llamacpp

    return Variant(name, lambda windows: llamacpp_logits(path, windows, kv_type, threads),
                   lambda ids: trace_llamacpp(path, ids, points, kv_type=kv_type, threads=threads, side=name))


def write_float_gguf(src, dst) -> Path:
    """A copy of the GGUF `src` with every tensor dequantised to F32 (metadata and llama.cpp's tensor
    layout, Q/K permutation included, unchanged): the float32 weights as a file llama.cpp can run
    and quantise."""
    from gguf import GGUFValueType, GGUFWriter

    dst = Path(dst)
    if dst.exists():
        raise NewLLMError(f"{dst}: already exists; not replacing it")
    reader = open_gguf(src)
    tmp = dst.with_name(f".{dst.name}.tmp")
    writer = GGUFWriter(str(tmp), field(reader, "general.architecture", src))
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub)
    writer.add_file_type(0)  # LLAMA_FTYPE_ALL_F32
    for t in reader.tensors:
        writer.add_tensor(t.name, read_tensor(t, src).numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst


def windows_of(tokens: Iterable[int], window: int, count: int) -> list[list[int]]:
    tokens = list(map(int, tokens))
    if len(tokens) < window * count:
        raise NewLLMError(f"quantisation effect: {count} windows of {window} need {window * count} tokens, "
                          f"got {len(tokens)}")
    return [tokens[i * window:(i + 1) * window] for i in range(count)]


def layer_sqnr(ref: Trace, test: Trace) -> list[float]:
    """SQNR (dB) of each layer's output, then of final_norm and logits."""
    names = [f"layers.{i}.resid_post" for i in range(ref.num_layers)] + ["final_norm", "logits"]
    return [error_metrics(test.tensors[n], ref.tensors[n])["sqnr_db"] for n in names]


def quantisation_effect(reference: Variant, variants: list[Variant], windows: list[list[int]]) -> dict:
    """Per variant: per-layer SQNR on window 0, and KL / top-1 / NLL over all windows (module doc)."""
    ref_trace = reference.trace(windows[0])
    sqnr = {v.name: layer_sqnr(ref_trace, v.trace(windows[0])) for v in variants}
    del ref_trace
    # every side advances one window at a time, so only one window's logits per side are held
    sums = {v.name: {"kl": 0.0, "top1": 0.0, "nll": 0.0} for v in [reference, *variants]}
    streams = [reference.logits(windows)] + [v.logits(windows) for v in variants]
    for w, (r, *tests) in tqdm(zip(windows, zip(*streams)), total=len(windows), desc="windows"):
        lr = F.log_softmax(r.double(), -1)
        nxt = torch.tensor(w[1:])[:, None]
        for v, t in zip([reference, *variants], [r, *tests]):
            lt = lr if t is r else F.log_softmax(t.double(), -1)
            s = sums[v.name]
            s["kl"] += float((lr.exp() * (lr - lt)).sum(-1).sum())
            s["top1"] += float((r.argmax(-1) == t.argmax(-1)).sum())
            s["nll"] += float(-lt[:-1].gather(-1, nxt).sum())
    n, scored = sum(len(w) for w in windows), sum(len(w) - 1 for w in windows)
    return {"reference": reference.name, "windows": len(windows), "window": len(windows[0]), "tokens": n,
            "variants": {name: {"kl": s["kl"] / n, "top1_agreement": s["top1"] / n, "nll": s["nll"] / scored,
                                "ppl": math.exp(s["nll"] / scored), "layer_sqnr_db": sqnr.get(name)}
                         for name, s in sums.items()}}
