"""The comparison experiment end to end on a tiny config (real text: tiny-shakespeare), its resume,
the training stream (facts mixed in as documents) and the config's errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from newllm.data.recall import recall_distance
from newllm.errors import NewLLMError
from newllm.experiment.config import ExperimentConfig, profile_config
from newllm.experiment.data import mix_documents
from newllm.experiment.run import run_experiment

TINY = {
    "profile": "test",
    "model_overrides": {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
                        "num_hidden_layers": 2},
    "memory_overrides": {"segment_length": 16},
    "data": {"bpe_vocab_size": 300},
    "samples": 48, "epochs": 1,
    "train": {"seq_len": 64, "batch_size": 8, "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 1,
              "checkpoint_every": 2, "log_every": 1},
    "eval": {"context": 64, "stride": 32, "batch_size": 8, "max_tokens": 1024, "position_context": 128,
             "position_docs": 2, "position_bins": 4, "speed_repeats": 1},
    "reversal": {"n_facts": 3, "repeats": 1, "max_new_tokens": 6},
    "passkey": {"lengths": [200, 260], "depths": [0.0, 1.0], "n_per_cell": 1, "digits": 2, "finetune_steps": 2,
                "finetune_batch_size": 2},
    "recall": {"steps": 2, "batch_size": 4, "n_pairs": 2, "eval_batches": 1},
    "device": "cpu", "progress": False,
}


@pytest.fixture(scope="module")
def corpus(shared_dir, tmp_path_factory):
    """A real-text corpus file (tiny-shakespeare's first 120k characters; split 90/5/5 by characters)."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text((shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:120_000])
    return path


def tiny_config(tmp_path, corpus, name="run", **changes) -> ExperimentConfig:
    d = json.loads(json.dumps(TINY))
    d["data"].update(corpus=str(corpus), cache_dir=str(tmp_path / "cache"))
    d["run_dir"] = str(tmp_path / name)
    d.update(changes)
    return ExperimentConfig.from_dict(d, where="test")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("exp")
    cfg = tiny_config(tmp, corpus, models=["pythia", "infini", "multi_memory", "hierarchical"])
    return cfg, run_experiment(cfg)


def test_end_to_end_writes_results_report_and_plots(finished):
    cfg, summary = finished
    root = Path(cfg.run_dir)
    on_disk = json.loads((root / "results.json").read_text())
    assert list(on_disk["models"]) == cfg.models and on_disk["profile"] == "test"
    for name, r in on_disk["models"].items():
        assert r["steps"] == 6 and r["train_tokens"] == 6 * 8 * 64  # ceil(48 windows / 8) steps, same for all
        for split in ("valid", "test"):
            assert 1.0 < r["ppl"][split]["token_ppl"] < 300 and r["ppl"][split]["n_tokens"] > 0
        rv = r["reversal"]
        assert rv["n_trained"] == 3 * 10 and rv["n_forward"] == rv["n_reverse"] == 3 * 3
        assert rv["gap"] == pytest.approx(rv["backward_ppl"] - rv["forward_ppl"], rel=1e-9)
        pk = r["passkey"]
        assert np.array(pk["accuracy"]).shape == (2, 2) and len(pk["finetune_losses"]) == 2
        assert 0.0 <= r["recall"]["accuracy"] <= 1.0 and r["recall"]["chance"] == 1 / 16
        pos = r["probes"]["position"]
        assert pos["length"] == 128 and len(pos["loss"]) == 127 and len(pos["bin_loss"]) == 4
        assert r["probes"]["speed"]["tokens_per_s"] > 0
        # the memory-off ablation: only for memory presets, identical to the normal pass in the first
        # segment (an empty memory reads as 0), different after it
        if name == "pythia":
            assert "loss_memory_off" not in pos
        else:
            on, off = np.array(pos["loss"]), np.array(pos["loss_memory_off"])
            assert pos["segment_length"] == 16
            np.testing.assert_allclose(off[:15], on[:15], rtol=1e-5, atol=1e-6, err_msg=name)
            assert np.abs(off[16:] - on[16:]).max() > 1e-4, name
        assert (root / "models" / name / "final" / "model.safetensors").exists()
    # the memory presets report their gates; hierarchical also its per-token expansion gate
    gates = {n: r["probes"]["position"]["gates"] for n, r in on_disk["models"].items()}
    assert gates["pythia"] == {}
    for name in ("infini", "multi_memory", "hierarchical"):  # the layers' declared gates, nothing guessed
        assert list(gates[name]) == ["L0"] and len(gates[name]["L0"]["gates"]["memory"]) == 4, name
        assert all(0.0 < g < 1.0 for g in gates[name]["L0"]["gates"]["memory"]), name
    assert gates["infini"]["L0"]["token_gates"] == gates["multi_memory"]["L0"]["token_gates"] == {}
    tg = gates["hierarchical"]["L0"]["token_gates"]["expansion"]
    assert tg["n"] == sum(tg["hist"]) > 0 and 0.0 < tg["mean"] < 1.0
    # a memory layer's state does not grow with the text; the KV caches of pythia do
    sizes = {n: r["probes"]["position"]["state_bytes"]["per_entry"] for n, r in on_disk["models"].items()}
    assert sizes["pythia"][0] > sizes["infini"][0] > 0
    report = (root / "report.md").read_text()
    for name in cfg.models:
        assert report.count(f"| `{name}` |") == 3  # one row in each of the three tables
    for png in ("loss_curves.png", "loss_by_position.png", "passkey_heatmap.png", "gates.png"):
        assert (root / png).stat().st_size > 1000 and f"]({png})" in report
    for f in ("train.jsonl", "test_forward.jsonl", "test_reverse.jsonl"):
        assert (root / "reversal" / f).exists()


def test_every_model_trains_on_the_same_stream(finished):
    cfg, summary = finished
    root = Path(cfg.run_dir)
    first = {}
    for name in cfg.models:
        recs = [json.loads(x) for x in (root / "models" / name / "metrics.jsonl").read_text().splitlines()]
        first[name] = [r["tokens"] for r in recs if r["kind"] == "train"]
    assert len({tuple(v) for v in first.values()}) == 1
    data = summary["data"]
    assert data["train_tokens"] == 48 * 64 + 1 and data["fact_documents"] == 3 * 10


def test_resume_skips_finished_models_and_redoes_only_missing_stages(finished, tmp_path):
    import shutil

    cfg, summary = finished
    copy = tmp_path / "copy"
    shutil.copytree(cfg.run_dir, copy)
    # as if killed during hierarchical's passkey stage: its results.json and passkey.json are gone
    (copy / "models" / "hierarchical" / "results.json").unlink()
    (copy / "models" / "hierarchical" / "evals" / "passkey.json").unlink()
    pythia_metrics = (copy / "models" / "pythia" / "metrics.jsonl").read_text()
    again = run_experiment(resume=copy)
    assert (copy / "models" / "pythia" / "metrics.jsonl").read_text() == pythia_metrics  # not retrained
    for name in cfg.models:
        a, b = summary["models"][name], again["models"][name]
        assert a["ppl"] == b["ppl"] and a["reversal"]["gap"] == b["reversal"]["gap"]
        assert a["passkey"]["samples"] == b["passkey"]["samples"]  # recomputed for hierarchical: the same answers


def test_a_training_run_killed_midway_resumes_to_the_same_numbers(tmp_path, corpus, monkeypatch):
    from newllm.train.loop import Trainer

    ref = run_experiment(tiny_config(tmp_path, corpus, "ref", models=["infini"], reversal={"enabled": False},
                                     passkey={"enabled": False}, recall={"enabled": False}))
    original = Trainer.run

    def killed(self, stop_after=None, tensorboard=True):
        original(self, stop_after=3, tensorboard=tensorboard)
        raise KeyboardInterrupt

    cfg = tiny_config(tmp_path, corpus, "killed", models=["infini"], reversal={"enabled": False},
                      passkey={"enabled": False}, recall={"enabled": False})
    monkeypatch.setattr(Trainer, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    monkeypatch.setattr(Trainer, "run", original)
    out = run_experiment(resume=cfg.run_dir)
    a, b = ref["models"]["infini"], out["models"]["infini"]
    assert b["steps"] == a["steps"] == 6
    assert b["ppl"]["valid"]["nll_sum"] == pytest.approx(a["ppl"]["valid"]["nll_sum"], rel=1e-6)
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-6)


def test_a_used_run_folder_needs_resume(finished):
    cfg, _ = finished
    with pytest.raises(NewLLMError, match="already holds an experiment"):
        run_experiment(cfg)
    with pytest.raises(NewLLMError, match="not an experiment run folder"):
        run_experiment(resume=cfg.run_dir + "-missing")


# ------------------------------------------------------------------------------ the training stream
def test_mix_documents_inserts_whole_documents_at_boundaries():
    sep = 0
    corpus = np.array([5, 6, 0, 7, 8, 9, 0, 10, 11, 0, 12, 13, 14, 0], dtype=np.int32)
    extra = [[100, 101], [200], [300, 301, 302]]
    s = mix_documents(corpus, extra, sep, budget=None, seed=3)
    assert len(s.tokens) == len(corpus) + sum(len(d) + 1 for d in extra) and s.fact_documents == 3
    docs = np.split(s.tokens, np.flatnonzero(s.tokens == sep) + 1)
    docs = [d[:-1].tolist() for d in docs if len(d)]
    assert sorted(map(tuple, (d for d in docs if d[0] >= 100))) == sorted(map(tuple, extra))
    assert [d for d in docs if d[0] < 100] == [[5, 6], [7, 8, 9], [10, 11], [12, 13, 14]]  # corpus order kept
    assert mix_documents(corpus, extra, sep, None, seed=3).tokens.tolist() == s.tokens.tolist()
    cut = mix_documents(corpus, extra, sep, budget=15, seed=3)
    assert len(cut.tokens) == 15 and cut.corpus_tokens == 15 - 9


def test_mix_documents_errors_name_the_budget():
    corpus = np.arange(1, 20, dtype=np.int32)
    with pytest.raises(NewLLMError, match="does not hold the 1 fact sentences"):
        mix_documents(corpus, [[1] * 30], 0, budget=16, seed=0)
    with pytest.raises(NewLLMError, match="lower samples"):
        mix_documents(corpus, [], 0, budget=100, seed=0)


# ------------------------------------------------------------------------------ config
def test_config_errors_are_one_line_and_name_the_key():
    with pytest.raises(NewLLMError, match="unknown model"):
        ExperimentConfig(models=["pythia", "nope"])
    with pytest.raises(NewLLMError, match="train.max_steps is set by the experiment"):
        ExperimentConfig(train={"max_steps": 10})
    with pytest.raises(NewLLMError, match=r"unknown key\(s\) \['passkey.lenghts'\]"):
        ExperimentConfig.from_dict({"passkey": {"lenghts": [1]}})
    with pytest.raises(NewLLMError, match="listed twice"):
        ExperimentConfig(models=["infini", "infini"])


def test_profiles_merge_recipe_and_flags(tmp_path):
    quick = profile_config("quick")
    assert quick.profile == "quick" and quick.data.bpe_vocab_size == 4096 and quick.seq_len == 256
    full = profile_config("full")
    assert full.data.tokenizer == "gpt-neox-20b" and full.model_overrides == {}  # the seed's Pythia-70m sizes
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {tokenizer: tok.json}\ntrain: {lr: 1.0e-4, min_lr: 1.0e-5}\n")
    mixed = profile_config("quick", recipe, ["models=[infini]", "eval.max_tokens=100"])
    assert mixed.data.tokenizer == "tok.json" and mixed.data.bpe_vocab_size is None
    assert mixed.train["lr"] == 1e-4 and mixed.train["seq_len"] == 256 and mixed.models == ["infini"]
    assert mixed.eval.max_tokens == 100
    # the memory overrides go only to presets with a memory layer
    assert "segment_length" in quick.overrides_for("infini") and "segment_length" not in quick.overrides_for("pythia")
    assert quick.train_config("hierarchical", 2048).max_steps == 2048 // 16
    # gate_lr becomes the "gates" group's lr of the memory presets only (pythia requests no such group)
    assert quick.train_config("infini", 1).param_groups == {"gates": {"lr": quick.gate_lr}}
    assert quick.train_config("pythia", 1).param_groups == {}
    # a recurrent preset trains with recurrent_mode (LCT by default); the others in parallel
    assert quick.train_config("context_pythia", 1).mode == "lct" and quick.train_config("infini", 1).mode == "parallel"
    with pytest.raises(NewLLMError, match="train.mode is set by the experiment itself \\(from recurrent_mode\\)"):
        ExperimentConfig(train={"mode": "lct"})


def test_cli_resume_refuses_other_settings(capsys):
    from newllm.cli import main

    assert main(["experiment", "--resume", "runs/x", "--models", "pythia"]) == 2
    assert "give no other settings" in capsys.readouterr().err


def test_tokenizer_names_resolve_under_the_data_dir(shared_dir):
    from newllm.experiment.run import resolve_tokenizer

    assert resolve_tokenizer("gpt-neox-20b", shared_dir) == str(shared_dir / "tokenizers" / "gpt-neox-20b" /
                                                                "tokenizer.json")
    assert resolve_tokenizer(None, shared_dir) is None
    with pytest.raises(NewLLMError, match="tokenizer 'nope' is neither a file nor"):
        resolve_tokenizer("nope", shared_dir)


ISOLATING = {"enabled": True, "models": ["pythia", "infini_all"], "full_attention": ["pythia"], "window": 8,
             "segments_per_window": 2, "carry_windows": 2, "samples": 24,
             "passkey": {"train_distances": [1.5], "test_distances": [1.5, 2.0], "steps": 2, "batch_size": 2,
                         "n_per_distance": 1, "digits": 2},
             "recall": {"distances": [1.5], "steps": 2, "batch_size": 4, "n_pairs": 2, "eval_batches": 1,
                        "capacity": [1, 3]},
             "position": {"split": "test", "length": 128, "docs": 2, "resamples": 50}}


def test_isolating_setting_end_to_end(tmp_path, corpus):
    iso = json.loads(json.dumps(ISOLATING))
    iso["position"]["corpus"] = str(corpus)
    cfg = tiny_config(tmp_path, corpus, "iso", models=[], isolating=iso, reversal={"enabled": False})
    summary = run_experiment(cfg)
    res = summary["isolating"]
    # 2 Pythia layers with a window of 8 reach 2 x 7 back; 2 memory layers with segments of 16, 2 x 15
    assert res["receptive_fields"] == {"pythia": 14, "infini_all": 30, "pythia-full": None}
    assert res["receptive_field"] == 30 and res["seq_len"] == 2 * 16
    models = res["models"]
    assert list(models) == ["pythia", "infini_all", "pythia-full"]
    for key, r in models.items():
        assert r["steps"] == 3 and r["train_tokens"] == 3 * 8 * 32  # 24 windows of 32 tokens, batch 8
        pk, rc, pos = r["iso_passkey"], r["iso_recall"], r["iso_position"]
        assert pk["train_distances"] == [45] and pk["test_distances"] == [45, 60]
        assert np.array(pk["accuracy"]).shape == (1, 2)
        assert rc["distances"][0] >= 45 and rc["chance"] == 1 / 16
        assert pos["start"] == 31 and pos["n_docs"] >= 1 and len(pos["curve_on"]) == 127
        memory = key == "infini_all"
        assert (pk["accuracy_memory_off"][0] is not None) == memory and (rc["accuracy_memory_off"] is not None) == memory
        assert ("gain" in pos) == memory
        # the diagnosis: read norms at the answer positions, the capacity sweep with every pair past R
        assert ("read_norms" in rc) == memory and ("capacity" in rc) == memory
        if memory:
            assert set(rc["read_norms"]) == {"L0", "L1"} and all(v["memory_read_rms"] > 0 for v in rc["read_norms"].values())
            assert [row["n_pairs"] for row in rc["capacity"]["rows"]] == [1, 3]
            assert all(recall_distance(row["n_pairs"], 16, row["gap"]) >= 45 for row in rc["capacity"]["rows"])
            assert rc["capacity"]["memory_dims"] == {"L0": 32, "L1": 32}
        assert r["overrides"].get("sliding_window") == (8 if key == "pythia" else None)
    vs = res["versus_window"]
    assert list(vs) == ["infini_all"] and vs["infini_all"]["baseline"] == "pythia"  # paired by document
    paired = np.array(models["pythia"]["iso_position"]["on"]["per_doc"]) - models["infini_all"]["iso_position"]["on"]["per_doc"]
    assert vs["infini_all"]["mean"] == pytest.approx(paired.mean(), abs=1e-12)
    gain = models["infini_all"]["iso_position"]["gain"]
    assert gain["mean"] == pytest.approx(np.mean(gain["per_doc"]))
    root = Path(cfg.run_dir)
    report = (root / "report.md").read_text()
    assert "## Isolating" in report and all(f"| `{k}` |" in report for k in models)
    assert "(vs `pythia`)" in report and "### Diagnosis" in report and "d = 32 here" in report
    gates = res["gate_history"]["infini_all"]  # the gates over training, from its metrics
    assert gates["steps"] == [1, 2, 3] and set(gates) == {"steps", "L0.memory", "L1.memory"}
    assert "`infini_all`, gates" in report and (root / "isolating_gates.png").stat().st_size > 1000
    assert (root / "isolating_passkey.png").stat().st_size > 1000
    assert (root / "isolating" / "infini_all" / "evals" / "iso_position.json").exists()


@pytest.mark.parametrize("change,match", [
    ({"passkey": {"test_distances": [1.0, 2.0]}}, "isolating.passkey.test_distances must be .* each > 1"),
    ({"recall": {"distances": [0.5]}}, "isolating.recall.distances must be"),
    ({"window": 0}, "isolating.window must be >= 1"),
    ({"models": ["nope"]}, "isolating.models: unknown or repeated preset"),
    ({"windoww": 8}, r"unknown key\(s\) \['isolating.windoww'\]"),
    ({"recall": {"capacity": [1, 17]}}, r"isolating.recall: n_pairs 8 and every capacity entry \[1, 17\] must be in"),
])
def test_isolating_config_errors_name_the_key(tmp_path, corpus, change, match):
    with pytest.raises(NewLLMError, match=match):
        tiny_config(tmp_path, corpus, isolating={**ISOLATING, **change})


def test_isolating_needs_a_segment_length(tmp_path, corpus):
    with pytest.raises(NewLLMError, match="isolating needs a memory segment length"):
        tiny_config(tmp_path, corpus, isolating=ISOLATING, memory_overrides={})
