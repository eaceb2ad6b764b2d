"""Trace points: names in execution order, shapes, the taps' placement (checked against the math
they must satisfy), statistics on known tensors, and that tracing changes nothing."""
from __future__ import annotations

import math

import pytest
import torch

import newllm
from newllm import NewLLMError
from newllm.diagnostics.trace import LAYER_POINTS, point_stats, trace_model
from newllm.models.layers import LAYER_REGISTRY, Block
from tests.diagnostics.conftest import IDS

LLAMA_POINTS = [p for p in LAYER_POINTS if not p.startswith("mem_")]


def test_llama_points_in_execution_order(hf_folder):
    model = newllm.load_pretrained(hf_folder, dtype=torch.float32)
    trace = trace_model(model, IDS)
    expected = ["embed"] + [f"layers.{i}.{p}" for i in range(2) for p in LLAMA_POINTS] + ["final_norm", "logits"]
    assert list(trace.tensors) == expected
    T, V = len(IDS), model.config.vocab_size
    shapes = {"embed": (T, 32), "layers.0.q": (T, 32), "layers.0.k": (T, 16), "layers.0.q_rope": (T, 32),
              "layers.0.k_rope": (T, 16), "layers.0.attn_ctx": (T, 32), "layers.1.act": (T, 64), "logits": (T, V)}
    for name, shape in shapes.items():
        assert tuple(trace.tensors[name].shape) == shape, name
    t = trace.tensors  # the residual algebra the points must satisfy
    torch.testing.assert_close(t["layers.0.resid_mid"], t["layers.0.resid_pre"] + t["layers.0.attn_out"])
    torch.testing.assert_close(t["layers.0.resid_post"], t["layers.0.resid_mid"] + t["layers.0.mlp_out"])
    torch.testing.assert_close(t["layers.1.act"], torch.nn.functional.silu(t["layers.1.gate"]) * t["layers.1.up"])
    assert torch.equal(t["layers.1.resid_pre"], t["layers.0.resid_post"])
    assert torch.equal(t["embed"], t["layers.0.resid_pre"])
    # position 0 is not rotated: q_rope == q there; later positions are
    assert torch.equal(t["layers.0.q_rope"][0], t["layers.0.q"][0])
    assert not torch.allclose(t["layers.0.q_rope"][1:], t["layers.0.q"][1:])


def test_tracing_changes_nothing_and_leaves_no_hooks(hf_folder):
    model = newllm.load_pretrained(hf_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = model(torch.tensor([IDS])).logits[0]
    trace = trace_model(model, IDS)
    assert torch.equal(trace.tensors["logits"], plain)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_memory_mixer_points_satisfy_the_gate_equation():
    from newllm.models.layers import InfiniLayer
    from newllm.models.model import TransformerLM

    model = TransformerLM([InfiniLayer(hidden_size=32, num_attention_heads=4, intermediate_size=64, segment_length=4)],
                          vocab_size=50)
    with torch.no_grad():
        model.layers[0].mixer.beta.uniform_(-2, 2)
    t = trace_model(model, torch.arange(10) % 50).tensors
    p = "layers.0."
    assert {p + "mem_local", p + "mem_read", p + "mem_gate"} <= set(t)
    assert p + "resid_mid" not in t  # parallel residual (neox block): there is no mid-layer residual
    g = torch.sigmoid(model.layers[0].mixer.beta.detach()).repeat_interleave(8)  # per head -> per channel
    torch.testing.assert_close(t[p + "mem_gate"][0], torch.sigmoid(model.layers[0].mixer.beta.detach()))
    torch.testing.assert_close(t[p + "attn_ctx"], t[p + "mem_local"] + g * (t[p + "mem_read"] - t[p + "mem_local"]))
    torch.testing.assert_close(t[p + "resid_post"], t[p + "resid_pre"] + t[p + "attn_out"] + t[p + "mlp_out"])


def test_neox_points_read_the_interleaved_projection():
    """Pythia rotates the first 25% of each head: the other 75% of q_rope must equal q there."""
    model = newllm.create_model("pythia", vocab_size=50, num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                intermediate_size=64)
    t = trace_model(model, torch.arange(7)).tensors
    q, qr = t["layers.0.q"].view(7, 4, 8), t["layers.0.q_rope"].view(7, 4, 8)
    assert torch.equal(q[..., 2:], qr[..., 2:]) and not torch.allclose(q[1:, :, :2], qr[1:, :, :2])
    assert "layers.0.gate" not in t and tuple(t["layers.0.up"].shape) == (7, 64)


def test_point_stats_on_a_known_tensor():
    x = torch.zeros(3, 4)
    x[0, 2] = 100.0  # a massive activation at the first token
    x[1, 1], x[2, 0], x[2, 3] = -3.0, 1.0, float("nan")
    x[1, 3] = float("inf")
    s = point_stats(x)
    assert (s["nan"], s["inf"], s["shape"], s["dtype"]) == (1, 1, [3, 4], "float32")
    assert s["max_abs"] == 100.0 and s["max_abs_at"] == [0, 2] and s["min"] == -3.0 and s["max"] == 100.0
    finite = torch.tensor([100.0, -3.0, 1.0] + [0.0] * 7)
    assert s["rms"] == pytest.approx(float(finite.pow(2).mean().sqrt()))
    assert s["mean"] == pytest.approx(98.0 / 10) and s["std"] == pytest.approx(float(finite.std(unbiased=False)))
    assert s["top_channels"][0] == [2, 100.0] and s["top_channels"][1] == [1, 3.0]
    assert s["pos0"] == {"rms": 50.0, "max_abs": 100.0, "max_abs_channel": 2}
    assert s["rest"] == {"rms": pytest.approx(math.sqrt(10 / 6)), "max_abs": 3.0, "max_abs_channel": 1,
                         "nonfinite": 2}  # NaN/Inf are counted apart, never hidden in a statistic
    assert s["max_over_median"] == math.inf  # median |x| is 0 here


def test_points_regex_and_bad_input(hf_folder):
    model = newllm.load_pretrained(hf_folder, dtype=torch.float32)
    assert list(trace_model(model, IDS, points=r"layers\.1\.(q|k)$").tensors) == ["layers.1.q", "layers.1.k"]
    with pytest.raises(NewLLMError, match="not a regular expression"):
        trace_model(model, IDS, points="layers.(")
    with pytest.raises(NewLLMError, match="one non-empty sequence"):
        trace_model(model, torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(LAYER_REGISTRY))
def test_every_registered_layer_type_traces(name):
    """Blocks give the block points; any other layer type at least its input and output."""
    from newllm.models.model import TransformerLM

    cls = LAYER_REGISTRY[name]
    model = TransformerLM([cls(config=cls.tiny_config())], vocab_size=40).eval()
    ids = torch.arange(9) % 40
    t = trace_model(model, ids).tensors
    with torch.no_grad():
        assert torch.equal(t["logits"], model(ids[None]).logits[0])
    expected = {"resid_pre", "resid_post"} | ({"attn_norm", "q", "k", "v", "attn_ctx", "attn_out", "ffn_norm",
                                              "up", "act", "mlp_out"} if isinstance(model.layers[0], Block) else set())
    assert expected <= {k.split(".")[-1] for k in t if k.startswith("layers.0.")}
