"""The memory-state API: get/set/save/load, carried to a fresh process (the seed's two-machine
example) on real text, validation against the model, damaged files, batch broadcast, sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from newllm import ModelMemoryState, NewLLMError, create_model, load_memory_state, save_memory_state
from newllm.checkpoints.native import save_model

TINY = dict(vocab_size=50304, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3)
MEMORY = {"infini": dict(segment_length=16), "multi_memory": dict(segment_length=16, num_memories=3),
          "hierarchical": dict(segment_length=16, num_memories=3)}


def tiny(name: str, **kw):
    torch.manual_seed(0)
    return create_model(name, **{**TINY, **MEMORY.get(name, {}), **kw}).eval()


@pytest.fixture(scope="module")
def text_ids(shared_dir):
    """Real text: WikiText-2 validation through the GPT-NeoX tokenizer, 4 batches of 1 x 40 + 1 x 24."""
    from newllm import load_tokenizer

    tok = load_tokenizer(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
    text = (shared_dir / "data" / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")[:4000]
    ids = torch.tensor(tok.encode(text)[:184])[None]
    assert ids.shape == (1, 184)
    return [ids[:, i:i + 40] for i in range(0, 160, 40)], ids[:, 160:]


CHILD = r"""
import sys, torch
from safetensors.torch import load_file, save_file
import newllm
from newllm.checkpoints.native import load_model
ids = load_file(sys.argv[1])["ids"]
for folder in sys.argv[2:]:  # one folder per model: model/, mem.safetensors -> out.safetensors
    model = load_model(folder + "/model").eval()
    model.set_memory_state(newllm.load_memory_state(folder + "/mem.safetensors"))
    with torch.no_grad():
        save_file({"logits": model(ids).logits.contiguous()}, folder + "/out.safetensors")
"""
FRESH = ["infini", "multi_memory", "hierarchical", "pythia"]


def test_save_load_in_fresh_process_continues_identically(text_ids, tmp_path):
    """Seed 001's two machines: accumulate memory over real text with update_memory=True, save the
    model and its memory, load both in a new Python process, continue: identical logits."""
    batches, cont = text_ids
    expected = {}
    for name in FRESH:
        model = tiny(name)
        model.reset_memory()
        with torch.no_grad():
            for b in batches:
                model(b, update_memory=True)
            expected[name] = model(cont).logits
            # the memory matters: without it the continuation differs
            assert (tiny(name)(cont).logits - expected[name]).abs().max() > 1e-3, name
        state = model.get_memory_state()
        assert state.tokens_absorbed == 160
        save_model(model, tmp_path / name / "model")
        save_memory_state(state, tmp_path / name / "mem.safetensors")
    save_file({"ids": cont.contiguous()}, str(tmp_path / "ids.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ids.safetensors"),
                           *(str(tmp_path / n) for n in FRESH)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in FRESH:
        got = load_file(str(tmp_path / name / "out.safetensors"))["logits"]
        torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def infini_with_memory():
    model = tiny("infini")
    ids = torch.randint(0, 50304, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, update_memory=True)
    return model


def test_header_is_self_describing(infini_with_memory, tmp_path):
    state = infini_with_memory.get_memory_state()
    save_memory_state(state, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["newllm"])
    assert header["format"] == "newllm.memory_state" and header["version"] == 2
    assert header["fingerprint"] == infini_with_memory.config.fingerprint()
    assert header["tokens_absorbed"] == 37 and not header["compact"]
    assert [e["layer_type"] for e in header["entries"]] == ["infini", "pythia", "pythia"]
    e0 = header["entries"][0]
    assert e0["state_type"] == "InfiniState" and e0["tokens"] == 37
    assert e0["tensors"]["memory"] == {"shape": [1, 1, 1, 32, 32], "dtype": "float32"}
    assert e0["tensors"]["segment_k"]["shape"] == [1, 37 % 16, 32]
    assert header["entries"][1]["tensors"]["k"]["shape"] == [1, 4, 37, 8]
    assert len(header["sha256"]) == 64


def test_roundtrip_is_exact(infini_with_memory, tmp_path):
    state = infini_with_memory.get_memory_state()
    save_memory_state(state, tmp_path / "m.safetensors")
    back = load_memory_state(tmp_path / "m.safetensors")
    assert isinstance(back, ModelMemoryState) and back.header() == state.header()
    a, b = state.named_tensors(), back.named_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expect_error(model, state, pattern):
    with pytest.raises(NewLLMError, match=pattern) as e:
        model.set_memory_state(state)
    assert "\n" not in str(e.value)


def test_incompatible_model_names_the_mismatch(infini_with_memory):
    state = infini_with_memory.get_memory_state()
    expect_error(tiny("multi_memory"), state, r"layer 0: state is for a 'infini' layer, the model has 'multi_memory'")
    expect_error(tiny("infini", num_hidden_layers=4), state, "3 layer entries, the model has 4 layers")
    expect_error(tiny("infini", memory_head_dim=16), state,
                 r"layer 0 \(infini\): tensor 'memory' has shape \(1, 1, 1, 32, 32\), this model's layer needs size 2 "
                 r"in dim 2")
    expect_error(tiny("infini", num_attention_heads=2), state, r"layer 1 \(pythia\): tensor 'k' has shape")
    # same shapes, different config (the delta rule changes what the memory means)
    other = tiny("infini", use_delta_rule=False)
    expect_error(other, state, f"fingerprint {state.fingerprint} does not match the model's "
                 f"{other.config.fingerprint()}")
    same = tiny("infini")
    same.set_memory_state(state)  # and the right model takes it


def test_damaged_files_are_rejected(infini_with_memory, tmp_path):
    path = tmp_path / "m.safetensors"
    save_memory_state(infini_with_memory.get_memory_state(), path)
    data = path.read_bytes()
    cases = {
        "flipped-tensor-byte": data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:],
        "truncated": data[: len(data) // 2],
        "header-garbage": data[:20] + b"\x00\x01" + data[22:],
        "empty": b"",
    }
    header_len = int.from_bytes(data[:8], "little")
    head = data[8:8 + header_len].decode()
    fp = infini_with_memory.config.fingerprint()
    # a tampered header that is still valid JSON: same length, another fingerprint
    cases["tampered-header"] = data[:8] + head.replace(fp, "0" * len(fp)).encode() + data[8 + header_len:]
    patterns = {"flipped-tensor-byte": "sha256 check failed", "tampered-header": "sha256 check failed",
                "truncated": "truncated or corrupt", "header-garbage": "truncated or corrupt",
                "empty": "truncated or corrupt"}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(NewLLMError, match=patterns[name]) as e:
            load_memory_state(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value), name
    with pytest.raises(NewLLMError, match="not found"):
        load_memory_state(tmp_path / "missing.safetensors")


def test_batch1_state_used_at_batch3(tmp_path):
    """A batch-1 state, through a file, continues 3 different rows (the richest state: hierarchical;
    tests/models/test_contract.py covers every preset with an in-memory state)."""
    name = "hierarchical"
    model = tiny(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(torch.randint(0, 50304, (1, 21), generator=g), update_memory=True)
        path = tmp_path / "m.safetensors"
        save_memory_state(model.get_memory_state(), path)
        cont = torch.randint(0, 50304, (3, 9), generator=g)
        other = tiny(name)
        other.set_memory_state(load_memory_state(path))
        batched = other(cont).logits
        for b in range(3):
            torch.testing.assert_close(batched[b:b + 1], model(cont[b:b + 1]).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["infini", "multi_memory", "hierarchical", "pythia"])
def test_memory_size_bytes_matches_tensors(name):
    model = tiny(name)
    d, S, M = 32, 16, 3
    fixed = {"infini": d * (d + 1) * 4 + 16, "multi_memory": M * d * (d + 2) * 4 + 16,
             "hierarchical": (M * d * (d + 2) + d * (d + 1)) * 4 + 16, "pythia": 8}[name]
    assert model.memory_size_bytes() == [fixed, 8, 8]  # nothing held: each layer's empty state (KV: its position)
    with torch.no_grad():
        model(torch.randint(0, 50304, (2, 21)), update_memory=True)
    held = model._memory
    sizes = model.memory_size_bytes()
    assert sizes == [0 if s is None else sum(t.numel() * t.element_size() for t in s) for s in held]
    kv = 2 * 2 * 4 * 21 * 8 * 4 + 8  # k and v (B=2, h=4, T=21, Dh=8) fp32 + pos
    partial = 2 * 2 * (21 % S) * d * 4  # segment_k/v of the incomplete segment
    assert sizes[1:] == [kv, kv]
    assert sizes[0] == (kv if name == "pythia" else 2 * (fixed - 16) + 16 + partial)
    assert model.get_memory_state().size_bytes() == sizes


def test_compact_state_keeps_only_compressive_memories(infini_with_memory, tmp_path):
    model = infini_with_memory
    compact = model.get_memory_state(compact=True)
    assert compact.compact and compact.tokens_absorbed == 37
    assert [e.tensors is None for e in compact.entries] == [False, True, True]
    save_memory_state(compact, tmp_path / "c.safetensors")
    other = tiny("infini")
    other.set_memory_state(load_memory_state(tmp_path / "c.safetensors"))
    cont = torch.randint(0, 50304, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = other(cont).logits
        # continuing from a compact state == the memory layer's state with every KV cache empty
        raw = (model._memory[0], None, None)
        torch.testing.assert_close(got, model(cont, state=raw).logits, atol=1e-6, rtol=0)
        assert (got - model(cont).logits).abs().max() > 1e-4  # not the full-state continuation
    assert sum(compact.size_bytes()) == model.memory_size_bytes()[0]


def test_reset_and_none():
    model = tiny("multi_memory")
    assert model.get_memory_state() is None
    with torch.no_grad():
        model(torch.randint(0, 50304, (1, 5)), update_memory=True)
        assert model.get_memory_state().tokens_absorbed == 5
        model.set_memory_state(None)
        assert model.get_memory_state() is None
    with pytest.raises(NewLLMError, match="expected a ModelMemoryState"):
        save_memory_state({"0.memory": torch.zeros(1)}, "x.safetensors")


def test_cli_save_info_check(shared_dir, tmp_path, capsys):
    from newllm.cli import main

    model = tiny("hierarchical")
    save_model(model, tmp_path / "model")
    save_model(tiny("infini"), tmp_path / "other")
    text = tmp_path / "t.txt"
    text.write_text((shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:600])
    tok = str(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
    out = tmp_path / "m.safetensors"
    assert main(["memory", "save", str(tmp_path / "model"), "--text", str(text), "--tokenizer", tok,
                 "--out", str(out), "--max-tokens", "50", "--chunk", "7", "--compact"]) == 0
    assert "50 tokens absorbed" in capsys.readouterr().out
    state = load_memory_state(out)
    assert state.compact and state.tokens_absorbed == 50 and state.layer_types == ["hierarchical", "pythia", "pythia"]
    assert main(["memory", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "HierarchicalState" in info and "compact" in info
    assert main(["memory", "check", str(out), str(tmp_path / "model")]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["memory", "check", str(out), str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "state is for a 'hierarchical' layer, the model has 'infini'" in err and err.count("\n") == 1
