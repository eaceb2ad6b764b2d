"""Native export: a pure Pythia / Llama stack becomes a GPTNeoXForCausalLM / LlamaForCausalLM folder that
plain transformers loads in a process where newllm cannot even be imported; logits equal ours to 1e-5
(fp32). Anything not pure is refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import newllm.hf as nh
from newllm import NewLLMError, create_model
from tests.hf.tiny import ids, randomise, tiny

ATOL = 1e-5

#: runs in a fresh interpreter: newllm is made unimportable, then plain transformers loads each folder
CHILD = r"""
import importlib.abc, json, sys
class NoNewLLM(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "newllm" or name.startswith("newllm."):
            raise ImportError("newllm must not be imported here")
sys.meta_path.insert(0, NoNewLLM())
import torch, transformers
from safetensors.torch import save_file
jobs = json.loads(sys.argv[1])
for job in jobs:
    model = transformers.AutoModelForCausalLM.from_pretrained(job["folder"]).eval()
    with torch.no_grad():
        logits = model(torch.tensor(job["ids"])).logits
    save_file({"logits": logits.contiguous()}, job["out"], metadata={"class": type(model).__name__})
assert "newllm" not in sys.modules and not any(m.startswith("newllm.") for m in sys.modules)
print("ok", len(jobs))
"""

CASES = {
    "pythia": (dict(), "GPTNeoXForCausalLM"),
    "pythia-sequential-full-rotary": (dict(use_parallel_residual=False, rotary_pct=1.0), "GPTNeoXForCausalLM"),
    "llama": (dict(), "LlamaForCausalLM"),  # GQA, tied head
    "llama-untied-biases": (dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True), "LlamaForCausalLM"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported, then loaded by one child process: case -> (model, folder, ids, class, logits)."""
    from safetensors import safe_open

    root = tmp_path_factory.mktemp("native")
    cases, jobs = {}, []
    for case, (overrides, cls) in CASES.items():
        model = tiny(case.split("-")[0], **overrides)
        folder = nh.export_native(model, root / case)
        x = ids(2, 17)
        cases[case] = (model, folder, x, cls)
        jobs.append({"folder": str(folder), "ids": x.tolist(), "out": str(root / f"{case}.safetensors")})
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True, cwd=root,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["ok", str(len(jobs))]
    out = {}
    for case, (model, folder, x, cls) in cases.items():
        with safe_open(str(root / f"{case}.safetensors"), framework="pt") as f:
            out[case] = (model, folder, x, cls, f.metadata()["class"], f.get_tensor("logits"))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_export_loads_without_newllm_with_equal_logits(case, exported):
    model, folder, x, cls, loaded_as, theirs = exported[case]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert loaded_as == cls
    with torch.no_grad():
        ours = model(x).logits
    assert ours.abs().max() > 1.0  # logits of order 1-10: the tolerance means something
    assert torch.allclose(theirs, ours, rtol=0, atol=ATOL), float((theirs - ours).abs().max())
    assert json.loads((folder / "config.json").read_text())["architectures"] == [cls]


def test_native_export_round_trips_through_our_own_loader(tmp_path):
    """checkpoints/hf.py (the reverse adapter) reads the exported folder back to the same weights."""
    import newllm

    model = tiny("llama")
    back = newllm.load_pretrained(nh.export_native(model, tmp_path / "native"))
    x = ids(1, 9)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def _not_pure(name, **kw):
    return randomise(create_model(name, vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                  num_hidden_layers=2, **kw))


@pytest.mark.parametrize("model, message", [
    (lambda: tiny("infini"), r"only a stack of one type, pythia or llama, .* \['infini', 'pythia'\]"),
    (lambda: tiny("infini_all"), r"\['infini'\]"),
    (lambda: _not_pure("pythia", sliding_window=8), "not a pure pythia stack: sliding_window=8"),
    (lambda: _not_pure("llama", num_key_value_heads=2, norm_eps=1e-3), "final norm rmsnorm eps 0.001"),
    (lambda: _not_pure("pythia", max_position_embeddings=None), "max_position_embeddings null"),
    (lambda: tiny("context_pythia"), "context_feedback"),
])
def test_models_that_are_not_pure_are_refused(model, message, tmp_path):
    with pytest.raises(NewLLMError, match=message):
        nh.export_native(model(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mixed_layer_specs_are_refused(tmp_path):
    from newllm.models import TransformerLM
    from newllm.models.layers import PythiaLayer

    layers = [PythiaLayer(32, 4, 64), PythiaLayer(32, 4, 128)]
    with pytest.raises(NewLLMError, match="layer 1 has another spec than layer 0"):
        nh.export_native(TransformerLM(layers=layers, vocab_size=97), tmp_path / "out")


def test_an_existing_export_is_replaced_only_with_force(tmp_path):
    model = tiny("pythia")
    folder = nh.export_native(model, tmp_path / "out")
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(NewLLMError, match="already holds config.json, model.safetensors; pass force=True"):
        nh.export_native(tiny("pythia", seed=3), folder)
    assert (folder / "model.safetensors").read_bytes() == before
    nh.export_native(tiny("pythia", seed=3), folder, force=True)
    assert (folder / "model.safetensors").read_bytes() != before
