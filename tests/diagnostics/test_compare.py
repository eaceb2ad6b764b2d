"""The comparison: metrics on known tensors, the added-error rule, token ids first, and the
reference sides on unfaulted tiny models (ours vs transformers: no divergence; requantised: a
measured, bounded difference)."""
from __future__ import annotations

import math

import pytest
import torch

import newllm
from newllm import NewLLMError
from newllm.checkpoints.gguf import load_gguf_model
from newllm.diagnostics.compare import compare_traces, error_metrics, logits_metrics
from newllm.diagnostics.hf_side import load_transformers_model, trace_transformers
from newllm.diagnostics.quant import requantize, weight_errors
from newllm.diagnostics.trace import Trace, trace_model
from tests.diagnostics.conftest import IDS


def test_error_metrics_on_known_tensors():
    ref = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    m = error_metrics(ref * 1.1, ref)
    assert m["nmse"] == pytest.approx(0.01) and m["sqnr_db"] == pytest.approx(20.0)
    assert m["cosine"] == pytest.approx(1.0) and m["max_abs_diff"] == pytest.approx(0.1 * float(ref.abs().max()))
    assert error_metrics(ref, ref)["sqnr_db"] == math.inf and error_metrics(-ref, ref)["cosine"] == pytest.approx(-1)
    bad = ref.clone()
    bad[0, 0] = float("nan")
    assert error_metrics(bad, ref)["nmse"] == math.inf


def test_logits_metrics():
    ref = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
    same = logits_metrics(ref, ref, k=2)
    assert same["kl"] == 0 and same["top1_agreement"] == 1 and same["top2_overlap"] == 1
    swapped = ref[:, [1, 0, 2, 3]]  # token 0's top-1 moves; token 1's top-2 set {1, 2} becomes {0, 2}
    m = logits_metrics(swapped, ref, k=2)
    assert m["top1_agreement"] == 0.0 and m["top2_overlap"] == 0.75 and m["kl"] > 0.1


def _trace(tensors, ids=(1, 2)):
    return Trace("x", list(ids), tensors, 1)


def test_first_divergence_is_the_point_that_adds_error():
    """Error made at attn_norm and only carried on by q: the divergence is attn_norm, not q."""
    r = {n: torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i, n in
         enumerate(["embed", "layers.0.resid_pre", "layers.0.attn_norm", "layers.0.q"])}
    t = dict(r)
    t["layers.0.attn_norm"] = r["layers.0.attn_norm"] * 1.01  # NMSE 1e-4
    t["layers.0.q"] = r["layers.0.q"] * 1.01
    cmp = compare_traces(_trace(r), _trace(t))
    assert cmp.first_divergence["point"] == "layers.0.attn_norm"
    assert abs(cmp.points["layers.0.q"]["added_nmse"]) < 1e-8  # float32 rounding of the 1.01 only
    assert not cmp.points["layers.0.q"]["diverges"]
    assert cmp.to_json()["first_divergence"]["point"] == "layers.0.attn_norm"
    assert compare_traces(_trace(r), _trace(r)).to_json()["first_divergence"] == {"point": None}


def test_token_ids_are_checked_first():
    with pytest.raises(NewLLMError, match="first difference at position 1 .2 vs 3."):
        compare_traces(_trace({}, (1, 2)), _trace({}, (1, 3)))
    with pytest.raises(NewLLMError, match="unknown tolerance"):
        compare_traces(_trace({}), _trace({}), "loose")


@pytest.mark.parametrize("source", ["hf_folder", "f32_gguf"])
def test_ours_equals_transformers_everywhere(request, source):
    path = request.getfixturevalue(source)
    ours = newllm.load_pretrained(path, dtype=torch.float32)
    cmp = compare_traces(trace_transformers(load_transformers_model(path), IDS), trace_model(ours, IDS))
    assert cmp.first_divergence is None and not cmp.only_in_reference and not cmp.only_in_test
    assert len(cmp.points) == 1 + 2 * 16 + 2
    assert max(m["nmse"] for m in cmp.points.values()) < 1e-12
    assert cmp.logits["top1_agreement"] == 1.0 and cmp.logits["kl"] < 1e-10


def test_requantised_side(f32_gguf):
    model = load_gguf_model(f32_gguf)
    q8 = requantize(model, "Q8_0")
    sqnr = weight_errors(model, q8)
    assert len(sqnr) == 2 * 7 + 2 and 30 < min(sqnr.values()) < 60  # 8-bit blocks: ~40 dB per weight
    assert torch.equal(q8.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.weight)  # norms stay
    cmp = compare_traces(trace_model(model, IDS), trace_model(q8, IDS), "requantized")
    assert cmp.first_divergence is None
    assert 1e-7 < cmp.points["layers.0.q"]["nmse"] < 1e-3 and cmp.points["embed"]["nmse"] > 0
    with pytest.raises(NewLLMError, match="unknown quantisation type"):
        requantize(model, "Q9_9")
