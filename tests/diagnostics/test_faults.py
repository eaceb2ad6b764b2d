"""Fault injection: each fault is put into newllm's side of a tiny model, and the comparison with
`transformers` on the same weights must name the exact point where it enters, and nothing before.

Tolerance: "same_precision" (added NMSE 1e-8). Unfaulted, the two sides agree to NMSE < 1e-12 at
every point (test_compare.py); each fault below adds 1e-4 or more at its point."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import newllm
from newllm.checkpoints import gguf_dequant
from newllm.checkpoints.gguf import load_gguf_model
from newllm.diagnostics.compare import compare_traces
from newllm.diagnostics.hf_side import load_transformers_model, trace_transformers
from newllm.diagnostics.trace import trace_model
from tests.diagnostics.conftest import IDS


def first_divergence(ours, reference_source) -> dict:
    ref = trace_transformers(load_transformers_model(reference_source), IDS)
    cmp = compare_traces(ref, trace_model(ours, IDS), "same_precision")
    assert cmp.first_divergence is not None, "the fault went unseen"
    first = cmp.first_divergence["point"]
    before = list(cmp.points)[:list(cmp.points).index(first)]
    assert all(cmp.points[p]["nmse"] < 1e-12 for p in before), "a point before the fault already differs"
    assert cmp.first_divergence["added_nmse"] > 1e-4
    return cmp.first_divergence


def test_wrong_rmsnorm_eps(hf_folder):
    ours = newllm.load_pretrained(hf_folder, dtype=torch.float32)
    ours.layers[1].post_attention_layernorm.eps = 1e-1  # the file says 1e-6
    assert first_divergence(ours, hf_folder)["point"] == "layers.1.ffn_norm"


def test_skipped_qk_permutation(f32_gguf, monkeypatch):
    """The GGUF loader forgets to undo llama.cpp's Q/K row permutation; transformers' own GGUF
    loading is the reference."""
    monkeypatch.setattr("newllm.checkpoints.gguf.unpermute_qk", lambda w, n: w)
    assert first_divergence(load_gguf_model(f32_gguf), f32_gguf)["point"] == "layers.0.q"


def buggy_q4_k(b: torch.Tensor) -> torch.Tensor:
    """Q4_K with the 6-bit scales of sub-blocks 4..7 read from the wrong nibble (the mins' one)."""
    n = b.shape[0]
    d, dmin = gguf_dequant._f16(b[:, 0:2]), gguf_dequant._f16(b[:, 2:4])
    a, m, c = b[:, 4:8], b[:, 8:12], b[:, 12:16]
    sc = torch.cat((a & 0x3F, (c >> 4) | ((a >> 6) << 4)), dim=1)  # bug: c >> 4 instead of c & 0x0F
    mn = torch.cat((m & 0x3F, (c >> 4) | ((m >> 6) << 4)), dim=1)
    q = gguf_dequant._nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return ((d * sc.float()).view(n, 8, 1) * q - (dmin * mn.float()).view(n, 8, 1)).reshape(n, 256)


def test_wrong_q4_k_scale_decode(q4k_gguf, monkeypatch):
    monkeypatch.setitem(gguf_dequant.DEQUANTIZERS, Q.Q4_K, buggy_q4_k)
    assert first_divergence(load_gguf_model(q4k_gguf), q4k_gguf)["point"] == "layers.0.mlp_out"


def test_correct_q4_k_decode_has_no_divergence(q4k_gguf):
    """Guards the test above: with the real decoder the same file agrees everywhere."""
    ref = trace_transformers(load_transformers_model(q4k_gguf), IDS)
    assert compare_traces(ref, trace_model(load_gguf_model(q4k_gguf), IDS)).first_divergence is None


@pytest.mark.parametrize("layer,proj,point", [(1, "up_proj", "up"), (0, "down_proj", "mlp_out")])
def test_one_mlp_weight_sign_flipped(hf_folder, layer, proj, point):
    ours = newllm.load_pretrained(hf_folder, dtype=torch.float32)
    w = getattr(ours.layers[layer].mlp, proj).weight
    with torch.no_grad():
        i = int(w.abs().argmax())
        w.view(-1)[i] = -w.view(-1)[i]
    assert first_divergence(ours, hf_folder)["point"] == f"layers.{layer}.{point}"
