"""`newllm train` end to end on a tiny recipe, YAML recipes and --set, --resume through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from newllm.cli import main
from newllm.errors import NewLLMError
from newllm.train.config import TrainConfig, apply_overrides, load_config

RECIPE = {
    "model": {"preset": "pythia", "overrides": {"hidden_size": 32, "num_attention_heads": 4,
                                                "intermediate_size": 64, "num_hidden_layers": 2}},
    "data": {"corpus": None, "bpe_vocab_size": 300},
    "eval": {"every": 3, "context": 32, "stride": 16, "batch_size": 4, "max_tokens": 256},
    "device": "cpu", "seq_len": 16, "batch_size": 4, "grad_accum": 2, "max_steps": 100,
    "warmup_steps": 2, "lr": 3e-3, "min_lr": 3e-4, "log_every": 1, "checkpoint_every": 3, "progress": False,
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, shared_dir):
    """A tiny recipe on a real text file (60k characters of tiny-shakespeare, split 90/5/5)."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "shakespeare.txt"
    corpus.write_text((shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:60000])
    d = json.loads(json.dumps(RECIPE))
    d["data"]["corpus"] = str(corpus)
    d["data"]["cache_dir"] = str(root / "cache")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    return root, path


@pytest.fixture(scope="module")
def finished_run(recipe):
    root, path = recipe
    run_dir = root / "run"
    rc = main(["train", "--config", str(path), "--set", "max_steps=6", "--set", "eval.every=3",
               "--set", f"run_dir={run_dir}", "--no-tensorboard"])
    assert rc == 0
    return run_dir


def test_train_writes_metrics_png_and_loadable_final_model(finished_run, capsys):
    from newllm.checkpoints.native import load_model
    from newllm import load_tokenizer

    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in train)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3]  # not at the last step: final eval covers it
    finals = {r["split"]: r for r in records if r["kind"] == "final"}
    assert set(finals) == {"valid", "test"}
    for r in finals.values():  # word PPL and bits per byte need the text: present and consistent
        assert r["word_ppl"] > r["token_ppl"] > 1 and 0 < r["bits_per_byte"] < 8
    png = (finished_run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((finished_run / "results.json").read_text())
    assert results["step"] == 6 and results["valid"]["token_ppl"] == finals["valid"]["token_ppl"]

    model = load_model(finished_run / "final")
    tok = load_tokenizer(finished_run / "final")
    assert model.config.vocab_size == tok.vocab_size and model.config.eos_token_id == tok.eos_token_id
    ckpt_model = load_model(finished_run / "checkpoints" / "step-0000006")
    for p, q in zip(model.parameters(), ckpt_model.parameters()):
        assert torch.equal(p, q)
    # `newllm eval ppl --model RUN_DIR/final` reads what train wrote
    cfg = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert cfg["max_steps"] == 6 and TrainConfig.from_dict(cfg).eval.every == 3


def test_resume_finished_run_with_a_larger_budget(finished_run, recipe, capsys):
    import shutil

    run_dir = finished_run.parent / "extended"
    shutil.copytree(finished_run, run_dir)
    rc = main(["train", "--resume", str(run_dir), "--set", "max_steps=8", "--set", "eval.final_splits=[valid]",
               "--no-tensorboard"])
    assert rc == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert [r["split"] for r in records if r["kind"] == "final"] == ["valid"]  # the old final records are dropped
    assert json.loads((run_dir / "results.json").read_text())["step"] == 8


def test_resume_of_corrupt_file_is_one_line_cli_error(tmp_path, capsys):
    bad = tmp_path / "trainer.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    assert main(["train", "--resume", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("newllm: error: ") and str(bad) in err and "\n" not in err


def test_set_parses_yaml_scalars_into_dotted_keys():
    d = apply_overrides({"eval": {"every": 5}}, ["eval.every=10", "lr=1e-3", "betas=[0.9, 0.99]",
                                                 "max_minutes=null", "model.overrides.hidden_size=64"])
    assert d == {"eval": {"every": 10}, "lr": 1e-3, "betas": [0.9, 0.99], "max_minutes": None,
                 "model": {"overrides": {"hidden_size": 64}}}
    with pytest.raises(NewLLMError, match="expected key=value"):
        apply_overrides({}, ["lr"])


def test_unknown_and_invalid_keys_name_the_key_and_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("max_steps: 10\neval: {everyy: 3}\n")
    with pytest.raises(NewLLMError, match=r"r\.yaml: unknown key\(s\) \['eval\.everyy'\]"):
        load_config(p)
    p.write_text("max_steps: 10\nlr: -1\n")
    with pytest.raises(NewLLMError, match=r"r\.yaml: train: lr must be > 0, got -1"):
        load_config(p)
    p.write_text("lr: 1.0e-3\n")
    with pytest.raises(NewLLMError, match="set a budget"):
        load_config(p)
    p.write_text("max_steps: 10\ndata: {tokenizer: t.json, bpe_vocab_size: 100}\n")
    with pytest.raises(NewLLMError, match="exactly one of data.tokenizer"):
        load_config(p)


@pytest.mark.parametrize("name", ["pythia_wikitext2", "pythia_wikitext2_cpu"])
def test_shipped_recipes_load(name):
    from pathlib import Path

    from newllm.models.presets import preset_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    assert cfg.data.corpus == "wikitext-2" and cfg.eval.final_splits == ["valid", "test"]
    mc = preset_config(cfg.model.preset, vocab_size=cfg.data.bpe_vocab_size, **cfg.model.overrides)
    assert cfg.eval.context <= mc.max_position_embeddings
