"""`newllm eval ppl`: a saved tiny model with its own tokenizer.json, on a real text file."""
from __future__ import annotations

import json
import re

import pytest
import torch

from newllm import create_model
from newllm.checkpoints.native import save_model
from newllm.cli import main
from newllm.data.bpe import train_bpe
from newllm.data.corpora import load_documents, load_tokens
from newllm.eval import sliding_window_perplexity


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("cli_eval")
    text = load_documents("tinyshakespeare", "valid", data_dir=shared_dir)[0][:3000]
    (root / "corpus.txt").write_text(text)
    tok = train_bpe([text], vocab_size=300)
    torch.manual_seed(0)
    model = create_model("pythia", vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=4,
                         intermediate_size=64, num_hidden_layers=2)
    save_model(model, root / "model")
    tok.save(root / "model" / "tokenizer.json")
    return root, model.eval(), tok, text


def test_ppl_json_matches_the_library(setup, capsys):
    root, model, tok, text = setup
    argv = ["eval", "ppl", "--model", str(root / "model"), "--data", str(root / "corpus.txt"), "--split", "all",
            "--context", "64", "--stride", "16", "--batch-size", "3", "--cache-dir", str(root / "cache"),
            "--no-progress", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    tokens = load_tokens(root / "corpus.txt", "all", tok, cache_dir=root / "cache")
    ref = sliding_window_perplexity(model, torch.from_numpy(tokens.astype("int64")), 64, 16, text=text,
                                    progress=False)
    assert out["n_tokens"] == ref.n_tokens == len(tokens) - 1
    assert out["nll_sum"] == pytest.approx(ref.nll_sum, rel=1e-6)
    assert out["n_words"] == len(text.split()) and out["n_bytes"] == len(text.encode())  # decoded text == original
    assert out["word_ppl"] == pytest.approx(ref.word_ppl, rel=1e-6)


def test_ppl_table_and_limit(setup, capsys):
    root, *_ = setup
    argv = ["eval", "ppl", "--model", str(root / "model"), "--data", str(root / "corpus.txt"), "--split", "all",
            "--context", "32", "--stride", "32", "--limit-tokens", "100", "--cache-dir", str(root / "cache"),
            "--no-progress"]
    assert main(argv) == 0
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert lines["tokens scored"] == str(100 - 4)  # 4 disjoint windows, each first token unscored
    assert float(lines["token PPL"]) > 5 and float(lines["word PPL"]) > 0 and float(lines["bits per byte"]) > 0


@pytest.mark.parametrize("extra,match", [
    (["--data", "wikitext-103"], "unknown corpus 'wikitext-103'"),
    (["--stride", "100", "--context", "50"], "stride 100 > context 50"),
    (["--limit-tokens", "1"], "--limit-tokens must be >= 2"),
])
def test_errors_are_one_line(setup, capsys, extra, match):
    root, *_ = setup
    argv = ["eval", "ppl", "--model", str(root / "model"), "--data", str(root / "corpus.txt"), "--split", "all",
            "--cache-dir", str(root / "cache"), "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("newllm: error:") and match in err and "\n" not in err


def test_preset_needs_a_tokenizer(capsys):
    assert main(["eval", "ppl", "--model", "pythia", "--no-progress"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
