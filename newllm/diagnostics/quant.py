"""The same weights at another quantisation: a second newllm model for the comparison.

    q8 = requantize(model, "Q8_0")    # every 2-D weight through gguf's quantiser and back

Each weight matrix (the linear layers' and the token embedding; norms stay float32, as llama.cpp's
converter keeps them) is quantised along its input dimension with `gguf.quants.quantize`, the
reference quantiser of llama.cpp's Python package, and dequantised with newllm's own
`gguf_dequant.dequantize` (equal to gguf's to the bit). Rows are quantised independently, so the
GGUF Q/K row permutation does not change the result. `weight_errors` reports each tensor's SQNR.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import quantize as gguf_quantize

from newllm.checkpoints.gguf_dequant import dequantize
from newllm.errors import NewLLMError
from newllm.models.model import TransformerLM


def qtype_of(name: str) -> Q:
    try:
        return Q[name.upper()]
    except KeyError:
        raise NewLLMError(f"unknown quantisation type {name!r}; e.g. Q8_0, Q4_0, Q4_1, Q5_0, Q5_1") from None


def round_trip(w: torch.Tensor, qtype: Q) -> torch.Tensor:
    """w (out, in) float -> quantised with gguf -> dequantised, float32, same shape."""
    block, _ = GGML_QUANT_SIZES[qtype]
    if w.shape[-1] % block:
        raise NewLLMError(f"requantize: rows of {w.shape[-1]} values are not whole {qtype.name} blocks of {block}")
    try:
        raw = gguf_quantize(w.detach().float().cpu().numpy().astype(np.float32), qtype)
    except NotImplementedError:
        raise NewLLMError(f"requantize: gguf has no quantiser for {qtype.name}") from None
    return dequantize(raw, qtype).reshape(w.shape)


def requantize(model: TransformerLM, qtype: str) -> TransformerLM:
    """A copy of `model` whose 2-D weights went through `qtype` (module docstring)."""
    q = qtype_of(qtype)
    out = copy.deepcopy(model)
    with torch.no_grad():
        done = set()
        for name, p in out.named_parameters():
            if p.dim() == 2 and id(p) not in done:  # a tied head is the embedding: quantised once
                p.copy_(round_trip(p, q).to(p.dtype))
                done.add(id(p))
    out.config = copy.deepcopy(model.config)
    out.config.name = f"{model.config.name or 'model'} requantised {q.name}"
    return out


def weight_errors(model: TransformerLM, other: TransformerLM) -> dict[str, float]:
    """SQNR (dB) of each of `other`'s 2-D weights against `model`'s."""
    theirs = dict(other.named_parameters())
    out = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            a, b = theirs[name].detach().double(), p.detach().double()
            err = float((a - b).pow(2).sum())
            out[name] = math.inf if err == 0 else 10 * math.log10(float(b.pow(2).sum()) / err)
    return out
