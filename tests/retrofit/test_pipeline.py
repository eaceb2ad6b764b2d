"""The staged retrofit (newllm/retrofit/): recipe checks, teacher forcing, what each stage freezes and
which lr each group gets, LoRA through PEFT (merged == unmerged), the numeric guards, resume after a
kill, and `newllm retrofit` end to end on a tiny Llama checkpoint and real text (tiny-shakespeare)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from newllm import NewLLMError, create_model
from newllm.checkpoints.native import load_model, save_model
from newllm.retrofit.config import LoRASpec, RetrofitConfig, load_retrofit_config
from newllm.retrofit.guards import FP16_MAX, NumericWatch
from newllm.retrofit.lora import add_lora, lora_modules, merge_lora
from newllm.retrofit.stages import StageTrainer, capture_io
from newllm.retrofit.surgery import memory_from_attention


VOCAB = 300


@pytest.fixture(scope="module")
def assets(tmp_path_factory, shared_dir):
    """A tiny 'pretrained' Llama (GQA) saved as a newllm folder with a BPE tokenizer trained on real text."""
    from newllm.data.bpe import train_bpe

    root = tmp_path_factory.mktemp("retrofit")
    text = (shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:40000]
    corpus = root / "shakespeare.txt"
    corpus.write_text(text)
    tok = train_bpe([text], VOCAB, min_frequency=2)
    torch.manual_seed(0)
    model = create_model("llama", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, num_hidden_layers=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = root / "tiny_llama"
    save_model(model, folder)
    tok.save(folder / "tokenizer.json")
    return {"root": root, "model": folder, "corpus": str(corpus), "tok": tok}


def recipe(assets, run_dir, stages, **kw) -> RetrofitConfig:
    d = {"model": {"path": str(assets["model"])}, "corpus": assets["corpus"], "run_dir": str(run_dir),
         "cache_dir": str(assets["root"] / "cache"), "progress": False,
         "surgery": {"layers": [1], "kind": "window_memory", "options": {"window": 8, "attention_sinks": 1}},
         "eval": {"corpus": assets["corpus"], "max_tokens": 400, "context": 64, "stride": 32, "stats_tokens": 32,
                  "max_new_tokens": 4, "state_tokens": [128]},
         "stages": stages, **kw}
    return RetrofitConfig.from_dict(d, where="test recipe")


def stage(**kw) -> dict:
    return {"name": "s", "kind": "transfer", "steps": 4, "lr": 1e-2, "seq_len": 32, "train_tokens": 200,
            "checkpoint_every": 2, "log_every": 1, **kw}


def tokens(assets):
    from newllm.data.corpora import load_tokens

    return load_tokens(assets["corpus"], "train", assets["tok"], cache_dir=assets["root"] / "cache")


def trainer_for(assets, tmp_path, **kw):
    cfg = recipe(assets, tmp_path / "run", [stage(**kw)])
    teacher = load_model(assets["model"]).eval()
    student = memory_from_attention(teacher, [1], kind="window_memory", window=8, attention_sinks=1)
    s = cfg.stages[0]
    toks = tokens(assets)[: s.train_tokens] if s.train_tokens else tokens(assets)
    return StageTrainer(s, student, teacher, [1], toks, tmp_path / "stage", cfg, str(assets["model"])), teacher


# ------------------------------------------------------------------------------ the recipe
def test_recipe_fields_are_checked_before_any_work(assets, tmp_path):
    bad = [({"stages": [stage(lr="fast")]}, r"stages\[0\].*lr must be a finite number"),
           ({"stages": [stage(kind="distil")]}, r"kind must be one of"),
           ({"stages": [stage(steps=0)]}, r"steps must be > 0"),
           ({"stages": [stage(min_lr=float("nan"))]}, r"min_lr must be a finite number"),
           ({"stages": [stage(), stage()]}, r"names must differ"),
           ({"stages": []}, r"at least one stage"),
           ({"stages": [stage(lora={"r": 0})]}, r"lora: r must be > 0"),
           ({"stages": [stage(stepz=3)]}, r"unknown key\(s\) \['stepz'\]"),
           ({"surgery": {"layers": [1, 1]}, "stages": [stage()]}, r"repeated"),
           ({"surgery": {"layers": "odd"}, "stages": [stage()]}, r"'every-other'")]
    for change, match in bad:
        d = {"model": {"path": str(assets["model"])}, "run_dir": str(tmp_path / "r"), **change}
        with pytest.raises(NewLLMError, match=match):
            RetrofitConfig.from_dict(d, where="recipe.yaml")


def test_set_reaches_into_a_stage(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("stages:\n  - {name: a, steps: 3}\n  - {name: b, steps: 5}\n")
    cfg = load_retrofit_config(f, ["stages.1.steps=7", "stages.0.lr=2e-3"])
    assert [s.steps for s in cfg.stages] == [3, 7] and cfg.stages[0].lr == 2e-3
    with pytest.raises(NewLLMError, match=r"stages.N: N must index an existing stage"):
        load_retrofit_config(f, ["stages.2.steps=7"])


# ------------------------------------------------------------------------------ stages
def test_teacher_forcing_feeds_each_replaced_layer_exactly_the_teachers_input(assets, tmp_path):
    tr, teacher = trainer_for(assets, tmp_path, target="mixer")
    seen = []
    h = tr.model.layers[1].mixer.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    x = tr.next_batch()
    tr.batch_loss(x, 0)
    h.remove()
    want = capture_io(teacher, [1], x[:, :-1], "mixer")[1][0]
    assert len(seen) == 1 and torch.equal(seen[0], want)
    # the student's own input to that mixer differs (its layer 1 is not the teacher's)... and the cache is used
    assert set(tr.teacher_cache) == set(tr.sampler.last_ids)
    tr.batch_loss(x, 0)
    assert len(tr.teacher_cache) == len(set(tr.sampler.last_ids))


def _trainable(tr) -> set[str]:
    return {n for n, p in tr.model.named_parameters() if p.requires_grad}


def test_what_each_stage_freezes_and_the_lr_of_each_group(assets, tmp_path):
    tr, _ = trainer_for(assets, tmp_path / "a", kind="transfer", train="new", gates_lr=0.5)
    assert _trainable(tr) == {"layers.1.self_attn.feature_map.weight", "layers.1.self_attn.window_factor"}
    assert {g["name"]: g["base_lr"] for g in tr.optimizer.param_groups} == {"replaced": 1e-2, "gates": 0.5}

    tr, _ = trainer_for(assets, tmp_path / "b", kind="new_layers", train="layer")
    assert _trainable(tr) == {n for n, _ in tr.model.named_parameters() if n.startswith("layers.1.")}

    tr, _ = trainer_for(assets, tmp_path / "c", kind="full", lr=1e-4, replaced_lr_scale=2.0, other_lr_scale=0.5)
    lrs = {g["name"]: g["base_lr"] for g in tr.optimizer.param_groups}
    assert lrs == pytest.approx({"replaced": 2e-4, "others": 5e-5, "gates": 2e-4})
    groups = {g["name"]: {id(p) for p in g["params"]} for g in tr.optimizer.param_groups}
    named = dict(tr.model.named_parameters())
    assert id(named["layers.0.self_attn.q_proj.weight"]) in groups["others"]
    assert id(named["layers.1.self_attn.q_proj.weight"]) in groups["replaced"]
    assert id(named["layers.1.self_attn.window_factor"]) in groups["gates"]
    assert _trainable(tr) == set(named)

    tr, _ = trainer_for(assets, tmp_path / "d", kind="lora", train="new", lora={"r": 2, "target_modules": ["q_proj"]})
    t = _trainable(tr)
    assert all("lora_" in n or n.startswith("layers.1.self_attn.") for n in t)
    assert sum("lora_A" in n for n in t) == 3 and "layers.1.self_attn.window_factor" in t
    assert {g["name"] for g in tr.optimizer.param_groups} == {"lora", "replaced", "gates"}


def test_lora_through_peft_merged_equals_unmerged(assets):
    model = load_model(assets["model"]).eval()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoRASpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert len(lora_modules(model)) == 9
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())  # PEFT froze the rest
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at 0; move it so that the adapters do something
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(ids).logits
        plain = load_model(assets["model"]).eval()(ids).logits
    assert (unmerged - plain).abs().max() > 1e-3  # the adapters change the output...
    merge_lora(model)
    assert not lora_modules(model) and set(model.state_dict()) == set(ref)
    with torch.no_grad():
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # ... and merging keeps it
    with pytest.raises(NewLLMError, match=r"\['qq_proj'\] match no linear module"):
        add_lora(load_model(assets["model"]), LoRASpec(target_modules=["qq_proj"]))


def test_numeric_watch_counts_an_injected_nan_and_an_fp16_overflow(assets):
    model = load_model(assets["model"]).eval()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with NumericWatch(model) as w, torch.no_grad():
        model(ids)
    assert w.totals() == {"nonfinite": 0, "fp16_overflow": 0, "mixer_nonfinite": 0, "mixer_fp16_overflow": 0}
    with torch.no_grad():
        model.layers[2].mlp.down_proj.weight.mul_(1e9)  # layer 2's output passes 65,504, still finite
    with NumericWatch(model) as w, torch.no_grad():
        model(ids)
    c = w.counts
    assert c["L2"]["fp16_overflow"] > 0 and c["L2"]["nonfinite"] == 0 and c["L1"]["fp16_overflow"] == 0
    assert c["L2"]["max_abs"] > FP16_MAX
    with torch.no_grad():
        model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with NumericWatch(model) as w, torch.no_grad(), pytest.warns(UserWarning, match="L1.mixer: .* NaN/Inf"):
        model(ids)
    assert w.counts["L1.mixer"]["nonfinite"] > 0 and w.counts["L0"]["nonfinite"] == 0
    assert set(w.flagged()) >= {"L1", "L1.mixer", "L2"}


def test_a_nonfinite_step_is_skipped_warned_and_counted(assets, tmp_path):
    tr, _ = trainer_for(assets, tmp_path, kind="new_layers", train="layer", steps=3)
    layer = tr.model.layers[1]
    with torch.no_grad():
        layer.mixer.window_factor.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with pytest.warns(UserWarning, match=r"non-finite loss nan at step 1: update skipped \(1 so far"):
        r = tr.train_step()
    assert r.skipped and tr.skipped == 1
    for n, p in tr.model.named_parameters():
        assert torch.equal(p, before[n]) or (n.endswith("window_factor") and p.isnan().all()), n


# ------------------------------------------------------------------------------ whole runs
STAGES = [stage(name="transfer", kind="transfer", target="mixer", steps=4),
          stage(name="tune", kind="lora", lr=1e-3, steps=4, kl_weight=1.0, lora={"r": 2}, train_tokens=None)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


def test_run_writes_reports_results_and_refuses_to_overwrite(assets, tmp_path):
    from newllm.retrofit.run import run_retrofit

    cfg = recipe(assets, tmp_path / "run", STAGES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_retrofit(cfg)
    run = tmp_path / "run"
    assert res["baseline"]["valid_ppl"] > 1 and res["retrofit"]["valid_ppl"] > 1
    assert [s["stage"] for s in res["stages"]] == ["surgery", "transfer", "tune"]
    assert json.loads((run / "results.json").read_text())["retrofit"]["valid_ppl"] == res["retrofit"]["valid_ppl"]
    for name in ("00_surgery", "01_transfer", "02_tune"):
        rep = json.loads((run / "stages" / name / "report.json").read_text())
        assert {"ppl", "completions", "layers", "numerics", "gates", "checks"} <= set(rep)
        assert len(rep["completions"]) == 3 and len(rep["layers"]) == 4  # embeddings + 3 layers
        if name != "02_tune":  # before LoRA touches layer 0, its output is the original's
            assert rep["layers"][1]["rel_rms_diff"] < 1e-6 and rep["layers"][2]["rel_rms_diff"] > 1e-4
        assert "memory_off" in rep and (run / "stages" / name / "report.md").is_file()
    assert (run / "stages" / "01_transfer" / "loss.png").is_file() and (run / "report.md").is_file()
    assert set(res["state_bytes"]["original"]) == {128}
    final = load_model(run / "stages" / "02_tune" / "model")  # LoRA merged: a plain model again
    assert not any("lora" in n for n in final.state_dict())
    with pytest.raises(NewLLMError, match="already holds a run; continue it with --resume"):
        run_retrofit(cfg)


def test_a_stage_killed_midway_resumes_to_the_same_result(assets, tmp_path):
    from newllm.retrofit.run import run_retrofit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_retrofit(recipe(assets, tmp_path / "whole", STAGES))
        cut = recipe(assets, tmp_path / "cut", STAGES)
        assert run_retrofit(cut, stop_after={"stage": "tune", "steps": 2}) == {"stopped": "tune", "step": 2}
        assert not (tmp_path / "cut" / "results.json").exists()
        run_retrofit(cut, resume=True)
    for name in ("01_transfer", "02_tune"):
        a, b = _weights(tmp_path / "whole" / "stages" / name), _weights(tmp_path / "cut" / "stages" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ra = json.loads((tmp_path / "whole" / "results.json").read_text())
    rb = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert ra["retrofit"] == rb["retrofit"]


def test_cli_runs_a_recipe_file_and_reports_bad_input_in_one_line(assets, tmp_path, capsys):
    import yaml

    from newllm.cli import main

    cfg = recipe(assets, tmp_path / "run", [stage(name="transfer", steps=2)])
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(cfg.to_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["retrofit", "--config", str(f), "--set", "eval.state_tokens=[]"]) == 0
    out = capsys.readouterr().out
    assert '"valid_ppl"' in out and "report.md" in out
    assert main(["retrofit", "--config", str(f), "--set", "stages.0.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lr must be a finite number" in err and str(f) in err
