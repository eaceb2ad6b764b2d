"""`newllm eval passkey --distances`, `eval recall`, `eval position`: a saved tiny memory-everywhere model,
its own tokenizer, real text; each reports the receptive field and the memory-off ablation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from newllm import create_model
from newllm.checkpoints.native import save_model
from newllm.cli import main
from newllm.data.bpe import train_bpe
from newllm.data.corpora import load_documents


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("cli_memory")
    text = load_documents("tinyshakespeare", "valid", data_dir=shared_dir)[0][:3000]
    (root / "corpus.txt").write_text(text)
    tok = train_bpe([text], vocab_size=300)
    torch.manual_seed(0)
    model = create_model("infini_all", vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=4,
                         intermediate_size=64, num_hidden_layers=2, segment_length=8)
    save_model(model, root / "model")
    tok.save(root / "model" / "tokenizer.json")
    return root, model.eval(), tok


def run_json(argv, capsys):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_passkey_by_distance(setup, capsys):
    root, model, _ = setup
    out = run_json(["eval", "passkey", "--model", str(root / "model"), "--distances", "30", "45", "--n-per-cell", "2",
                    "--digits", "2", "--no-progress", "--json"], capsys)
    assert out["receptive_field"] == model.receptive_field == 14 and out["distances"] == [30, 45]
    assert len(out["accuracy"]) == len(out["accuracy_memory_off"]) == 2
    assert [s["distance"] for s in out["samples"]] == [30, 30, 45, 45]


def test_recall_beyond_the_receptive_field(setup, capsys):
    root, *_ = setup
    out = run_json(["eval", "recall", "--model", str(root / "model"), "--distance", "20", "--segment-length", "8",
                    "--n-pairs", "2", "--batch-size", "4", "--eval-batches", "1", "--no-progress", "--json"], capsys)
    assert out["distance"] >= 20 and out["receptive_field"] == 14
    assert 0 <= out["accuracy"] <= 1 and out["accuracy_memory_off"] is not None and out["chance"] == 1 / 16


def test_position_beyond_the_receptive_field(setup, capsys):
    root, model, _ = setup
    base = ["eval", "position", "--model", str(root / "model"), "--data", str(root / "corpus.txt"), "--split", "all",
            "--cache-dir", str(root / "cache"), "--length", "96", "--docs", "1", "--json"]
    whole, pieces = run_json(base, capsys), run_json([*base, "--chunk", "13"], capsys)
    assert whole["start"] == 15 and whole["n_docs"] == 1
    assert whole["on"]["ci"] == [None, None]  # one document: no interval
    np.testing.assert_allclose(pieces["curve_on"], whole["curve_on"], atol=1e-5, rtol=0)  # any split == one call
    np.testing.assert_allclose(pieces["curve_off"], whole["curve_off"], atol=1e-5, rtol=0)
    on, off = np.array(whole["curve_on"]), np.array(whole["curve_off"])
    np.testing.assert_allclose(on[:7], off[:7], atol=1e-5, rtol=0)  # the first segment: an empty memory reads 0
    assert np.abs(on[8:] - off[8:]).max() > 1e-6
    assert whole["gain"]["mean"] == pytest.approx(whole["off"]["mean"] - whole["on"]["mean"], abs=1e-9)


def test_bad_input_is_one_line(setup, capsys):
    root, *_ = setup
    assert main(["eval", "recall", "--model", str(root / "model"), "--distance", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--distance must be >= 1" in err
