"""Point-by-point comparison of two traces, and the first point where they part.

    cmp = compare_traces(reference, test, tolerance=TOLERANCES["same_precision"])
    cmp.first_divergence      # None, or the first point whose *added* error exceeds the tolerance

Per point (reference r, test t, both (T, C) float32, summed in float64):

    NMSE   = sum (t - r)^2 / sum r^2
    SQNR   = -10 log10(NMSE) dB            (inf when equal)
    cosine = <t, r> / (|t| |r|),  max |t - r|

Added error. An implementation's error at a point is partly inherited from the point's inputs (a
small difference in the residual stream reappears, rescaled, in the next norm and projection)
and partly made by the step itself. The step's own share is estimated as

    added = NMSE(point) - max over its inputs of NMSE(input)

(inputs: `trace.point_inputs`, e.g. `gate` <- `ffn_norm`, `resid_post` <- `resid_mid`,
`mlp_out`), and the first point in execution order whose added error exceeds `tolerance.nmse`
is named. Taking the inputs' maximum makes the rule conservative: a step that only passes its
input's error on (a norm rescales error and signal alike, a residual add mixes its inputs' errors)
adds about zero, while a step that computes something else adds about its own NMSE.

Tolerances (`TOLERANCES`), by kind of pair:

* "same_precision" 1e-8: two float32 PyTorch implementations of the same math (ours vs
  transformers, or ours vs ours). Reordered float32 sums differ by ~1e-7 relative per element,
  i.e. NMSE ~1e-14; 1e-8 leaves six orders of margin and is still 5+ orders below the smallest
  bug the fault tests inject.
* "llamacpp_float" 1e-5: llama.cpp on float32 weights (a tiny F32 GGUF). Its matmuls stay F32, but
  the KV cache is F16 by default (NMSE ~1e-7 at attn_ctx, 2^-11 relative rounding) and its
  kernels sum in other orders.
* "llamacpp_quantized" 1e-2: llama.cpp on quantised weights. With the same dequantised weights,
  llama.cpp's CPU matmuls round each activation row to the weight type's dot-product partner
  (Q8_0 / Q8_1 / Q8_K, 8-bit with one scale per 32 or 256 values: NMSE ~1e-4 per matmul) and the
  KV cache to F16; a wrong eps, sign flip, permutation or dequantisation adds 1e-2 and more.
* "requantized" 0.1: a second newllm model on the same weights quantised differently (Q8_0 vs the
  F32 dequantisation): each requantised matmul adds its weight error; 0.1 flags only gross errors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from newllm.diagnostics.trace import Trace, point_inputs, split_name
from newllm.errors import NewLLMError


@dataclass(frozen=True)
class Tolerance:
    name: str
    nmse: float  # largest added NMSE a step may contribute
    why: str


TOLERANCES = {
    "same_precision": Tolerance("same_precision", 1e-8, "two float32 PyTorch implementations: NMSE ~1e-14 expected"),
    "llamacpp_float": Tolerance("llamacpp_float", 1e-5, "llama.cpp on F32 weights: F16 KV cache, other sum orders"),
    "llamacpp_quantized": Tolerance("llamacpp_quantized", 1e-2,
                                    "llama.cpp on quantised weights: activations rounded to Q8 in each matmul, "
                                    "F16 KV cache (~1e-4 NMSE per matmul)"),
    "requantized": Tolerance("requantized", 1e-1, "the same weights quantised differently: each matmul adds its "
                                                  "weight error"),
}


def error_metrics(test: torch.Tensor, ref: torch.Tensor) -> dict:
    """NMSE, SQNR (dB), cosine and max |diff| of `test` against `ref` (same shape)."""
    if test.shape != ref.shape:
        raise NewLLMError(f"compare: shapes differ, {tuple(test.shape)} vs reference {tuple(ref.shape)}")
    t, r = test.double(), ref.double()
    diff = t - r
    err, sig = float(diff.pow(2).sum()), float(r.pow(2).sum())
    nmse = err / sig if sig > 0 else (0.0 if err == 0 else math.inf)
    nt, nr = float(t.norm()), float(r.norm())
    cosine = float((t * r).sum()) / (nt * nr) if nt > 0 and nr > 0 else (1.0 if nt == nr else 0.0)
    if not math.isfinite(err):  # NaN/Inf on one side
        nmse, cosine = math.inf, math.nan
    return {"nmse": nmse, "sqnr_db": -10 * math.log10(nmse) if 0 < nmse < math.inf else (math.inf if nmse == 0 else
                                                                                          -math.inf),
            "cosine": cosine, "max_abs_diff": float(diff.abs().max()) if diff.numel() else 0.0}


def logits_metrics(test: torch.Tensor, ref: torch.Tensor, k: int = 5) -> dict:
    """Per-token KL(ref || test) of the softmaxed (T, V) logits (mean), same top-1 (fraction), and
    top-k overlap (mean |top-k(ref) & top-k(test)| / k)."""
    lp_r, lp_t = F.log_softmax(ref.double(), -1), F.log_softmax(test.double(), -1)
    kl = (lp_r.exp() * (lp_r - lp_t)).sum(-1)
    top1 = (ref.argmax(-1) == test.argmax(-1)).double()
    k = min(k, ref.shape[-1])
    tr, tt = ref.topk(k, -1).indices, test.topk(k, -1).indices
    overlap = (tr[:, :, None] == tt[:, None, :]).any(-1).double().sum(-1) / k
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(top1.mean()),
            f"top{k}_overlap": float(overlap.mean()), "tokens": int(ref.shape[0])}


@dataclass
class Comparison:
    reference: str
    test: str
    tolerance: Tolerance
    points: dict[str, dict]  # name -> metrics (+ "added_nmse", "input_nmse")
    first_divergence: dict | None
    logits: dict | None
    only_in_reference: list[str] = field(default_factory=list)
    only_in_test: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"reference": self.reference, "test": self.test, "tolerance": asdict(self.tolerance),
                "first_divergence": self.first_divergence or {"point": None}, "logits": self.logits,
                "points": self.points, "only_in_reference": self.only_in_reference, "only_in_test": self.only_in_test}


def check_same_tokens(ref: Trace, test: Trace) -> None:
    if ref.token_ids != test.token_ids:
        n = min(len(ref.token_ids), len(test.token_ids))
        at = next((i for i in range(n) if ref.token_ids[i] != test.token_ids[i]), n)
        a = ref.token_ids[at] if at < len(ref.token_ids) else "end"
        b = test.token_ids[at] if at < len(test.token_ids) else "end"
        raise NewLLMError(f"compare: {ref.side} and {test.side} tokenised differently: {len(ref.token_ids)} vs "
                          f"{len(test.token_ids)} tokens, first difference at position {at} ({a} vs {b})")


def compare_traces(ref: Trace, test: Trace, tolerance: Tolerance | str = "same_precision") -> Comparison:
    """Walk the points both traces have, in the test trace's execution order (module docstring)."""
    if isinstance(tolerance, str):
        if tolerance not in TOLERANCES:
            raise NewLLMError(f"compare: unknown tolerance {tolerance!r}; known: {sorted(TOLERANCES)}")
        tolerance = TOLERANCES[tolerance]
    check_same_tokens(ref, test)
    if ref.num_layers != test.num_layers:
        raise NewLLMError(f"compare: {ref.side} has {ref.num_layers} layers, {test.side} has {test.num_layers}")
    common = [n for n in test.tensors if n in ref.tensors]
    points, first = {}, None
    for name in common:
        m = error_metrics(test.tensors[name], ref.tensors[name])
        inputs = [points[i]["nmse"] for i in point_inputs(name, test.num_layers) if i in points]
        m["input_nmse"] = max(inputs) if inputs else 0.0
        m["added_nmse"] = m["nmse"] - m["input_nmse"] if math.isfinite(m["nmse"]) else math.inf
        m["diverges"] = bool(m["added_nmse"] > tolerance.nmse)
        points[name] = m
        if m["diverges"] and first is None:
            layer, point = split_name(name)
            first = {"point": name, "layer": layer, "kind": point, **{k: m[k] for k in
                     ("nmse", "input_nmse", "added_nmse", "sqnr_db", "cosine", "max_abs_diff")}}
    logits = logits_metrics(test.tensors["logits"], ref.tensors["logits"]) if "logits" in common else None
    return Comparison(ref.side, test.side, tolerance, points, first, logits,
                      only_in_reference=[n for n in ref.tensors if n not in test.tensors],
                      only_in_test=[n for n in test.tensors if n not in ref.tensors])
