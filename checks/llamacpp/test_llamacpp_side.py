"""The llama.cpp side (needs llama-cpp-python; run by `make llamacpp-check`, not by `make test`:
see docs/diagnostics.md, "CI").

On tiny GGUF files written with `gguf` (tests/diagnostics/conftest.py): the ctypes struct matches
the installed ggml.h; on float32 weights with an F32 KV cache llama.cpp and newllm agree at every
point (tolerance "llamacpp_float", added NMSE 1e-5; measured ~1e-13); each injected fault is
named at the point where it enters, against llama.cpp as the reference. On the real SmolLM2 file:
no divergence beyond "llamacpp_quantized" (1e-2) and the same top-1 token for >= 90% of positions.
"""
from __future__ import annotations

import json

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from newllm.checkpoints import gguf_dequant, load_tokenizer
from newllm.checkpoints.gguf import load_gguf_model
from newllm.cli import main
from newllm.diagnostics.compare import compare_traces
from newllm.diagnostics.llamacpp import check_layout, installed_ggml_h, llamacpp_token_ids, trace_llamacpp
from newllm.diagnostics.trace import trace_model
from tests.diagnostics.conftest import IDS
from tests.diagnostics.test_faults import buggy_q4_k


def test_struct_layout_matches_the_installed_ggml_h():
    header = installed_ggml_h()
    assert header is not None, "llama-cpp-python installed no ggml.h"
    layout = check_layout(header.read_text())
    assert layout["name"] == 256 and layout["__size__"] == 336


def test_float32_file_agrees_at_every_point(f32_gguf):
    ref = trace_llamacpp(f32_gguf, IDS, kv_type="f32")
    cmp = compare_traces(ref, trace_model(load_gguf_model(f32_gguf), IDS), "llamacpp_float")
    assert cmp.first_divergence is None and not cmp.only_in_test and not cmp.only_in_reference
    assert len(cmp.points) == 1 + 2 * 16 + 2
    assert max(m["nmse"] for m in cmp.points.values()) < 1e-9
    assert cmp.logits["top1_agreement"] == 1.0
    # a layer's input is the previous layer's output, captured for it even when only inputs are asked for
    only = trace_llamacpp(f32_gguf, IDS, points=r"resid_pre$", kv_type="f32").tensors
    assert list(only) == ["layers.0.resid_pre", "layers.1.resid_pre"]
    assert (only["layers.1.resid_pre"] - ref.tensors["layers.0.resid_post"]).abs().max() < 1e-6


def test_same_token_ids(f32_gguf):
    text = "the thing is 123 and the world's café"
    assert llamacpp_token_ids(f32_gguf, text) == load_tokenizer(f32_gguf).encode(text)


def named(ours, path, tolerance="llamacpp_float") -> str:
    cmp = compare_traces(trace_llamacpp(path, IDS, kv_type="f32"), trace_model(ours, IDS), tolerance)
    assert cmp.first_divergence is not None
    return cmp.first_divergence["point"]


def test_faults_are_named_against_llamacpp(f32_gguf, q4k_gguf, monkeypatch):
    model = load_gguf_model(f32_gguf)
    model.layers[1].post_attention_layernorm.eps = 1e-1
    assert named(model, f32_gguf) == "layers.1.ffn_norm"
    model = load_gguf_model(f32_gguf)
    w = model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        i = int(w.abs().argmax())
        w.view(-1)[i] *= -1
    assert named(model, f32_gguf) == "layers.1.up"
    # Q4_K: llama.cpp's own matmul rounds activations to Q8_K, so the quantised tolerance applies
    cmp = compare_traces(trace_llamacpp(q4k_gguf, IDS, kv_type="f32"), trace_model(load_gguf_model(q4k_gguf), IDS),
                         "llamacpp_quantized")
    assert cmp.first_divergence is None
    with monkeypatch.context() as m:
        m.setitem(gguf_dequant.DEQUANTIZERS, Q.Q4_K, buggy_q4_k)
        assert named(load_gguf_model(q4k_gguf), q4k_gguf, "llamacpp_quantized") == "layers.0.mlp_out"
    with monkeypatch.context() as m:
        m.setattr("newllm.checkpoints.gguf.unpermute_qk", lambda w, n: w)
        assert named(load_gguf_model(f32_gguf), f32_gguf) == "layers.0.q"


@pytest.mark.slow
def test_smollm2_against_llamacpp(tmp_path, capsys):
    if not SMOLLM_GGUF.is_file():
        pytest.fail(f"{SMOLLM_GGUF} is needed by this check")
    out = tmp_path / "t.json"
    assert main(["trace", str(SMOLLM_GGUF), "--text", "The capital of France is Paris. The capital of Germany is",
                 "--against", "llama.cpp", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["first_divergence"] == {"point": None} and data["tolerance"]["name"] == "llamacpp_quantized"
    assert data["logits"]["top1_agreement"] >= 0.9 and data["logits"]["kl"] < 0.05
    assert "first divergence: none" in capsys.readouterr().out


from tests.conftest import SMOLLM_GGUF  # noqa: E402
