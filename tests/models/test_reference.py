"""Every preset keeps its parameter count, initial weights and initial logits across refactors.

The reference (`data/preset_reference.json` + `data/preset_logits.safetensors`) was written by
`python tests/models/test_reference.py --write` at commit 576f866, before layers became blocks x
token mixers (issue 10). Weights are compared as a multiset of per-tensor sha256 digests, so a
renamed or reordered parameter still matches while any changed value (or a changed random stream:
the same seed must draw the same numbers) does not. Logits are compared to 1e-5 (fp32).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
REFERENCE, LOGITS = DATA / "preset_reference.json", DATA / "preset_logits.safetensors"
TINY = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3)
EXTRA = {"llama": dict(num_key_value_heads=2), "infini": dict(segment_length=8),
         "multi_memory": dict(segment_length=6, num_memories=3),
         "hierarchical": dict(segment_length=6, num_memories=3)}
SEED_PRESETS = ("pythia", "infini", "multi_memory", "hierarchical", "llama", "context_pythia")


def tiny(name: str):
    from newllm import create_model

    torch.manual_seed(0)
    return create_model(name, **{**TINY, **EXTRA.get(name, {})}).eval()


def full_size_parameters(name: str) -> int:
    from newllm import create_model

    with torch.device("meta"):  # shapes only: no memory, no random draws
        return create_model(name).num_parameters()


def tensor_digests(model) -> list[str]:
    return sorted(hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                  for t in model.state_dict().values())


def probe_ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))


def measure(name: str):
    model = tiny(name)
    with torch.no_grad():
        logits = model(probe_ids()).logits
    return {"parameters": full_size_parameters(name), "tiny_parameters": model.num_parameters(),
            "digests": tensor_digests(model)}, logits


@pytest.mark.parametrize("name", SEED_PRESETS)
def test_preset_matches_reference(name):
    from safetensors.torch import load_file

    ref = json.loads(REFERENCE.read_text())[name]
    got, logits = measure(name)
    assert got["parameters"] == ref["parameters"]
    assert got["tiny_parameters"] == ref["tiny_parameters"]
    assert got["digests"] == ref["digests"], "initial weights differ from the recorded ones (same seed)"
    torch.testing.assert_close(logits, load_file(str(LOGITS))[name], atol=1e-5, rtol=0)


if __name__ == "__main__" and "--write" in sys.argv:
    from safetensors.torch import save_file

    DATA.mkdir(exist_ok=True)
    results, all_logits = {}, {}
    for n in SEED_PRESETS:
        results[n], all_logits[n] = measure(n)
        print(n, results[n]["parameters"], results[n]["tiny_parameters"])
    REFERENCE.write_text(json.dumps(results, indent=1) + "\n")
    save_file(all_logits, str(LOGITS))
