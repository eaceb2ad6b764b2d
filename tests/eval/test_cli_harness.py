"""`newllm eval harness`: lm-eval and newllm's evaluator side by side on a saved tiny transformers-format
model, offline, on the local WikiText-2 file."""
from __future__ import annotations

import json

import pytest
import torch

from newllm import create_model
from newllm.cli import main
from newllm.data.bpe import train_bpe
from newllm.eval.harness import wikitext_pages

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, shared_dir):
    import newllm.hf as nh
    from tests.hf.tiny import randomise

    root = tmp_path_factory.mktemp("cli_harness")
    tok = train_bpe(wikitext_pages("valid", limit=2, data_dir=shared_dir), vocab_size=300)
    torch.manual_seed(0)
    model = randomise(create_model("pythia", vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=4,
                                   intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64))
    nh.to_hf(model).save_pretrained(root / "model")
    tok.save(root / "model" / "tokenizer.json")
    return root / "model"


@pytest.mark.slow
def test_both_backends_agree_through_the_command(hf_folder, shared_dir, capsys):
    argv = ["eval", "harness", "--model", str(hf_folder), "--tasks", "wikitext", "--split", "valid", "--limit-docs",
            "2", "--max-length", "32", "--batch-size", "4", "--backend", "both", "--data-dir", str(shared_dir),
            "--no-progress", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["documents"] == 2 and out["max_length"] == 32 and out["prefix_token_id"] == 0
    theirs, ours = out["results"]["lm-eval"]["wikitext"], out["results"]["newllm"]["wikitext"]
    assert theirs["sample_len"] == ours["sample_len"] == 2
    for metric, rel in out["relative_difference"].items():
        assert rel <= 1e-4, metric
        assert theirs[metric] > 1.0
    assert ours["windows"] > 2 * 2


def test_the_newllm_backend_alone_needs_no_lm_eval_run(hf_folder, shared_dir, capsys):
    argv = ["eval", "harness", "--model", str(hf_folder), "--tasks", "wikitext", "--split", "valid", "--limit-docs",
            "1", "--backend", "newllm", "--data-dir", str(shared_dir), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "windows of   64 tokens" in text and "newllm   wikitext   word_perplexity" in text  # lm-eval's default


@pytest.mark.parametrize("extra, message", [
    (["--backend", "newllm", "--tasks", "wikitext,lambada_openai"], "for wikitext only"),
    (["--tasks", "wikitext", "--limit-docs", "0"], "--limit-docs must be >= 1"),
    (["--tasks", " , "], "at least one task"),
    (["--tasks", "wikitext", "--prefix-token-id", "100000"], "--prefix-token-id 100000 is outside"),
])
def test_bad_arguments_are_one_line(hf_folder, extra, message, capsys):
    assert main(["eval", "harness", "--model", str(hf_folder), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar, if any
    assert err.startswith("newllm: error:") and message in err


@pytest.mark.slow
def test_other_tasks_run_offline_and_fail_in_one_line(hf_folder, monkeypatch, capsys):
    """A task whose data is not local is refused without a single network connection."""
    import socket

    import huggingface_hub.constants

    before = huggingface_hub.constants.HF_HUB_OFFLINE
    tried = []

    def no_network(self, address):
        tried.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert main(["eval", "harness", "--model", str(hf_folder), "--tasks", "lambada_openai", "--limit-docs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("newllm: error: lm-eval could not run ['lambada_openai'] offline")
    assert tried == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE == before  # the switch is put back after the run
