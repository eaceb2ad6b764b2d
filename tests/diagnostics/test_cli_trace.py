"""`newllm trace`: the table, JSON with first_divergence, the growth plot, saved tensors, and
one-line errors for bad input; existing files are not replaced without --force."""
from __future__ import annotations

import json
import sys

import pytest
from safetensors import safe_open

from newllm.cli import main
from tests.diagnostics.conftest import IDS

TEXT = "the thing is 123 and the world"


def test_trace_against_transformers_writes_everything(f32_gguf, tmp_path, capsys):
    out = {k: tmp_path / f"t.{k}" for k in ("json", "png", "safetensors")}
    rc = main(["trace", str(f32_gguf), "--text", TEXT, "--against", "transformers", "--json", str(out["json"]),
               "--plot", str(out["png"]), "--save-tensors", str(out["safetensors"]),
               "--points", r"resid_post|logits|q$"])
    printed = capsys.readouterr().out
    assert rc == 0 and "first divergence: none" in printed
    assert [line.split()[0] for line in printed.splitlines()[2:5]] == ["0", "1", "logits"]  # rows by layer
    data = json.loads(out["json"].read_text())
    assert data["first_divergence"] == {"point": None} and data["tolerance"]["name"] == "same_precision"
    assert set(data["sides"]) == {"newllm", "transformers"}
    stats = data["sides"]["newllm"]["stats"]
    assert set(stats) == {"layers.0.q", "layers.0.resid_post", "layers.1.q", "layers.1.resid_post", "logits"}
    assert {"rms", "max_abs_at", "top_channels", "pos0", "rest", "nan", "inf"} <= set(stats["layers.0.q"])
    assert data["points"]["logits"]["nmse"] < 1e-12 and data["logits"]["top1_agreement"] == 1.0
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    with safe_open(str(out["safetensors"]), "pt") as f:
        assert set(f.keys()) == {f"{s}/{p}" for s in ("newllm", "transformers") for p in stats}
        assert tuple(f.get_tensor("newllm/layers.1.q").shape) == (len(json.loads(f.metadata()["token_ids"])), 32)


def test_requantised_side_and_marked_divergence(hf_folder, capsys, tmp_path):
    ids = ",".join(map(str, IDS))
    assert main(["trace", str(hf_folder), "--ids", ids, "--against", "requant:Q4_0", "--tolerance",
                 "same_precision", "--json", str(tmp_path / "q.json")]) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["first_divergence"]["point"] == "embed"  # Q4_0 embeddings already differ at 1e-8
    assert "<<" in printed and "first divergence: embed" in printed


@pytest.mark.parametrize("args,message", [
    (["--against", "nothing-here"], "not transformers, llama.cpp, requant:QTYPE or an existing model"),
    (["--points", "layers.("], "not a regular expression"),
    (["--against", "requant:Q9_9"], "unknown quantisation type"),
    (["--ids", "1,x"], "expected comma-separated integers"),
    (["--ids", "1,100000"], "outside the vocabulary"),
    (["--against", "transformers", "--tolerance", "loose"], "--tolerance 'loose': one of"),
])
def test_bad_input_is_one_line(f32_gguf, capsys, args, message):
    argv = ["trace", str(f32_gguf)] + (args if "--ids" in args else ["--text", TEXT] + args)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("newllm: error: ") and "\n" not in err and message in err, err


def test_no_tokenizer_and_no_overwrite(hf_folder, tmp_path, capsys):
    assert main(["trace", str(hf_folder), "--text", "hello"]) == 2
    assert "give --ids" in capsys.readouterr().err
    target = tmp_path / "keep.json"
    target.write_text("mine")
    assert main(["trace", str(hf_folder), "--ids", "1,2,3", "--json", str(target)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and target.read_text() == "mine"
    assert main(["trace", str(hf_folder), "--ids", "1,2,3", "--json", str(target), "--force"]) == 0
    assert json.loads(target.read_text())["token_ids"] == [1, 2, 3]


def test_llamacpp_side_errors_without_running_llamacpp(f32_gguf, hf_folder, capsys, monkeypatch):
    """Runs in CI, where llama-cpp-python is not installed (checks/llamacpp run it for real)."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    assert main(["trace", str(f32_gguf), "--text", TEXT, "--against", "llama.cpp"]) == 2
    assert "needs llama-cpp-python (pip install 'newllm[llamacpp]'" in capsys.readouterr().err
    assert main(["trace", str(hf_folder), "--ids", "1,2", "--against", "llama.cpp"]) == 2
    assert "the llama.cpp side needs a .gguf file" in capsys.readouterr().err
