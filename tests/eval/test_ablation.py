"""memory_read_norms: the diagnosis of what each memory layer reads (issue 14)."""
from __future__ import annotations

import torch

from newllm import create_model
from newllm.eval.ablation import memory_read_norms, memory_switched_off


def tiny(preset="infini_all"):
    torch.manual_seed(0)
    extra = {} if preset == "pythia" else {"segment_length": 8}
    return create_model(preset, vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        num_hidden_layers=2, **extra).eval()


def test_read_norms_are_zero_where_the_memory_is_empty_and_match_the_tap():
    model = tiny()
    ids = torch.randint(0, 50, (2, 24))
    first = torch.zeros(2, 24, dtype=torch.bool)
    first[:, :8] = True  # the first segment reads an empty memory: A_mem == 0 exactly
    norms = memory_read_norms(model, ids, first)
    assert set(norms) == {"L0", "L1"}
    assert all(v["memory_read_rms"] == 0.0 and v["local_rms"] > 0 for v in norms.values())
    later = memory_read_norms(model, ids, ~first)
    seen = {}
    hook = model.layers[1].mixer.tap_memory_read.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    with torch.no_grad():
        model(ids)
    hook.remove()
    expected = seen["a"][:, 8:].float().pow(2).mean().sqrt()
    assert abs(later["L1"]["memory_read_rms"] - float(expected)) <= 1e-6 * float(expected)
    gate = torch.sigmoid(model.layers[0].mixer.beta).mean()
    assert abs(norms["L0"]["gate_mean"] - float(gate)) < 1e-7


def test_read_norms_skip_switched_off_and_memoryless_layers():
    model = tiny()
    ids = torch.randint(0, 50, (1, 16))
    with memory_switched_off(model):
        assert memory_read_norms(model, ids) == {}
    assert memory_read_norms(tiny("pythia"), ids) == {}
    assert set(memory_read_norms(model, ids)) == {"L0", "L1"}  # the switch was put back
