"""Issue 13's defects, one test (or a few) per defect: nothing a user made is lost, no write replaces
what it should not, no path read from a file leaves its folder, no config loads silently wrong, no
header allocates more than its file backs, non-finite results are loud, and bad input is one line.
The property-based counterpart is tests/test_fuzz.py; docs/reliability.md maps each promise here."""
from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from newllm import NewLLMError, create_model, load_memory_state, save_memory_state
from newllm.checkpoints.native import load_model, save_model
from newllm.cli import main
from newllm.files import atomic_write, check_output, contained, dumps_json

TINY = dict(vocab_size=300, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (what a strict JSON reader does)."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"bare {c}")))


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("newllm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("rel")
    path = root / "shakespeare.txt"
    path.write_text((shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:60000])
    return path


@pytest.fixture(scope="module")
def tok(text_file):
    from newllm.data.bpe import train_bpe

    return train_bpe([text_file.read_text()[:20000]], 300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """A tiny newllm model folder with its tokenizer.json."""
    folder = tmp_path_factory.mktemp("model") / "m"
    torch.manual_seed(0)
    save_model(create_model("pythia", **{**TINY, "vocab_size": tok.vocab_size}), folder)
    tok.save(folder / "tokenizer.json")
    return folder


# ------------------------------------------------------------------ 1. data loss: train into an existing run
def recipe(tmp_path, text_file, **fields) -> Path:
    d = {"model": {"preset": "pythia", "overrides": {k: v for k, v in TINY.items() if k != "vocab_size"}},
         "data": {"corpus": str(text_file), "bpe_vocab_size": 300, "cache_dir": str(tmp_path / "cache")},
         "eval": {"every": 0, "context": 32, "stride": 16, "batch_size": 4, "final_splits": ["valid"]},
         "device": "cpu", "seq_len": 16, "batch_size": 4, "max_steps": 2, "warmup_steps": 1,
         "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 2, "progress": False,
         "run_dir": str(tmp_path / "run")}
    for k, v in fields.items():
        node = d
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_refuses_a_run_dir_holding_a_finished_run(tmp_path, text_file, capsys):
    path = recipe(tmp_path, text_file)
    assert main(["train", "--config", str(path), "--no-tensorboard"]) == 0
    before = snapshot(tmp_path / "run")
    assert "final/model.safetensors" in before and "checkpoints/latest" in before
    capsys.readouterr()
    rc = main(["train", "--config", str(path), "--no-tensorboard"])
    one_line_error(capsys, rc, "holds a previous run", "--resume", "--force")
    assert snapshot(tmp_path / "run") == before  # not one byte of the finished run changed


def test_force_starts_over_and_never_reuses_the_old_tokenizer(tmp_path, text_file, capsys):
    from newllm import load_tokenizer

    assert main(["train", "--config", str(recipe(tmp_path, text_file)), "--no-tensorboard"]) == 0
    old_vocab = load_tokenizer(tmp_path / "run" / "tokenizer.json").vocab_size
    path = recipe(tmp_path, text_file, **{"data.bpe_vocab_size": 400, "max_steps": 1})
    assert main(["train", "--config", str(path), "--no-tensorboard", "--force"]) == 0
    new = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert new.vocab_size != old_vocab and new.vocab_size > 300
    model = load_model(tmp_path / "run" / "final")
    assert model.config.vocab_size == new.vocab_size  # the model is built with the tokenizer the config asked for
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["bpe_vocab_size"] == 400
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-0000001"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in lines) == 1  # the old run's records are gone, not mixed in


# ------------------------------------------------------------------ 2. writes that replace what they should not
def non_regular_paths(tmp_path) -> dict[str, Path]:
    paths = {"directory": tmp_path / "a-dir", "symlink": tmp_path / "a-link", "fifo": tmp_path / "a-fifo"}
    paths["directory"].mkdir()
    (tmp_path / "target.txt").write_text("keep me")
    paths["symlink"].symlink_to(tmp_path / "target.txt")
    os.mkfifo(paths["fifo"])
    try:  # a device node (root only): the issue's case
        os.mknod(tmp_path / "a-device", 0o600 | 0o020000, os.makedev(1, 3))
        paths["device"] = tmp_path / "a-device"
    except (PermissionError, OSError):
        pass
    return paths


def test_atomic_write_never_replaces_a_non_regular_file(tmp_path):
    for kind, p in non_regular_paths(tmp_path).items():
        with pytest.raises(NewLLMError, match="exists and is") as e:
            atomic_write(p, lambda tmp: tmp.write_text("x"))
        assert str(p) in str(e.value), kind
        with pytest.raises(NewLLMError):
            check_output(p, force=True)
    assert (tmp_path / "target.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_atomic_write_removes_its_temporary_on_failure_and_keeps_the_old_file(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("old")

    def full_disk(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError) as e:
        atomic_write(p, full_disk)
    assert e.value.filename == str(p) and e.value.strerror == "No space left on device"  # the user's path, not ours
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["out.json"]


def test_memory_save_refuses_existing_out_unless_forced(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"a user's file")
    argv = ["memory", "save", str(model_dir), "--text", str(text_file), "--out", str(out), "--max-tokens", "20"]
    one_line_error(capsys, main(argv), "already exists", "--force")
    assert out.read_bytes() == b"a user's file"
    for kind, p in non_regular_paths(tmp_path).items():
        one_line_error(capsys, main([*argv[:-4], "--out", str(p), "--max-tokens", "20", "--force"]), str(p))
    assert main([*argv, "--force"]) == 0
    assert load_memory_state(out).tokens_absorbed == 20


def test_checkpoint_write_failure_leaves_no_temporaries_and_the_old_checkpoint(tmp_path, monkeypatch):
    from newllm.train import checkpoint as ckpt

    model = create_model("pythia", **TINY)
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, model, {"tokens": 1}, keep=3)
    stale = [root / ".tmp-step-0000007-999999999", root / ".latest-999999999"]  # a killed process's leftovers
    stale[0].mkdir()
    stale[1].write_text("step-0000007\n")

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, 2, model, {"tokens": 2}, keep=3)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]
    assert (root / "latest").read_text().strip() == "step-0000001"


def test_cli_reports_os_errors_as_one_line_naming_the_path(monkeypatch, capsys):
    import newllm.cli.info as info

    for err, needle in ((OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"),
                         "/runs/x/model.safetensors: No space left on device"),
                        (PermissionError(errno.EACCES, "Permission denied", "/ro/out.json"),
                         "/ro/out.json: Permission denied"),
                        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/tmp", None, "/mnt/ro/out"),
                         "/mnt/ro/tmp -> /mnt/ro/out: Read-only file system")):
        monkeypatch.setattr(info, "run", lambda args, e=err: (_ for _ in ()).throw(e))
        one_line_error(capsys, main(["info", "pythia"]), needle)


def test_read_only_cache_dir_warns_and_continues(tmp_path, tok, text_file, monkeypatch):
    from newllm.data import corpora

    def read_only(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(corpora.tempfile, "mkstemp", read_only)
    with pytest.warns(RuntimeWarning, match="cannot write"):
        ids = corpora.load_tokens(str(text_file), "train", tok, cache_dir=tmp_path / "cache")
    assert len(ids) > 1000


# ------------------------------------------------------------------ 3. paths that escape
@pytest.fixture
def small_run(tmp_path, text_file):
    path = recipe(tmp_path, text_file)
    assert main(["train", "--config", str(path), "--no-tensorboard"]) == 0
    return tmp_path / "run"


def test_latest_pointer_outside_its_folder_is_refused(small_run, capsys):
    other = small_run.parent / "other" / "checkpoints"
    shutil.copytree(small_run / "checkpoints" / "step-0000002", other / "step-0000002")
    for name in ("../../other/checkpoints/step-0000002", "/etc/passwd", "step-1/../../x"):
        (small_run / "checkpoints" / "latest").write_text(name + "\n")
        one_line_error(capsys, main(["train", "--resume", str(small_run), "--set", "max_steps=3"]),
                       str(small_run / "checkpoints" / "latest"), "refused")
    assert sorted(p.name for p in other.iterdir()) == ["step-0000002"]  # nothing written into the other run


def test_a_checkpoint_moved_out_of_its_run_does_not_write_into_its_grandparent(small_run, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "kept" / "step-0000002"
    shutil.copytree(small_run / "checkpoints" / "step-0000002", moved)
    one_line_error(capsys, main(["train", "--resume", str(moved), "--set", "max_steps=3"]),
                   "not inside a run folder", "--set run_dir")
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["kept"]
    # told where to continue, it continues there
    target = tmp_path / "continued"
    assert main(["train", "--resume", str(moved), "--set", "max_steps=3", "--set", f"run_dir={target}",
                 "--no-tensorboard"]) == 0
    assert (target / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["kept"]


def hf_llama_folder(folder: Path, **config) -> Path:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = LlamaForCausalLM(cfg)
    d = cfg.to_dict()
    d.update(config)
    (folder / "config.json").write_text(json.dumps(d))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              str(folder / "shard.safetensors"))
    return folder


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_hf_shard_index_cannot_name_files_outside_the_folder(tmp_path, shard):
    from newllm import load_pretrained

    folder = hf_llama_folder(tmp_path / "hf", tie_word_embeddings=True)
    shutil.copy(folder / "shard.safetensors", tmp_path / "outside.safetensors")
    names = json.loads(json.dumps(list(__import__("safetensors").safe_open(str(folder / "shard.safetensors"),
                                                                           "pt").keys())))
    (folder / "shard.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(NewLLMError, match="refused") as e:
        load_pretrained(folder)
    assert "model.safetensors.index.json" in str(e.value) and "\n" not in str(e.value)


def test_contained_resolves_symlinks_out_of_the_folder(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "link").symlink_to(tmp_path)
    with pytest.raises(NewLLMError, match="outside"):
        contained(tmp_path / "base", "link/secret", "index.json")
    assert contained(tmp_path / "base", "a/b.safetensors", "index.json") == tmp_path / "base" / "a" / "b.safetensors"


# ------------------------------------------------------------------ 4. silent wrong models
def edit_header(folder: Path, edit) -> None:
    f = folder / "newllm.json"
    header = json.loads(f.read_text())
    edit(header["config"])
    f.write_text(json.dumps(header))


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    (lambda c: c["layers"][1].pop("num_attention_heads"), "layers[1].num_attention_heads"),
    (lambda c: c["layers"][0].update(hidden_size=64.5), "layers[0].hidden_size must be an integer, got 64.5"),
    (lambda c: c.update(vocab_size="300"), "vocab_size must be an integer, got '300'"),
    (lambda c: c.update(norm_eps=float("nan")), "norm_eps must be a finite number"),
    (lambda c: c["layers"][0].update(type="nope"), "layers[0].type 'nope'"),
], ids=["tie-string", "missing-heads", "float-size", "string-vocab", "nan-eps", "unknown-type"])
def test_newllm_json_fields_are_validated(tmp_path, edit, needle):
    folder = tmp_path / "m"
    save_model(create_model("pythia", **TINY), folder)
    edit_header(folder, edit)
    with pytest.raises(NewLLMError) as e:
        load_model(folder)
    assert str(folder / "newllm.json") in str(e.value) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("field,value,needle", [
    ("seq_len", True, "seq_len must be an integer, got True"),
    ("min_lr", float("nan"), "min_lr must be a finite number, got nan"),
    ("lr", "fast", "lr must be a finite number, got 'fast'"),
    ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
    ("device", "tpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("num_threads", "many", "num_threads must be an integer or null, got 'many'"),
    ("eval.final_splits", "valid", "eval.final_splits must be a list"),
    ("model.overrides", ["x"], "model.overrides must be a mapping"),
])
def test_recipe_fields_are_validated_when_read(tmp_path, text_file, field, value, needle):
    from newllm.train.config import load_config

    path = recipe(tmp_path, text_file)
    d = yaml.safe_load(path.read_text())
    node = d
    *parents, last = field.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(NewLLMError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "not supported between" not in msg, msg


def test_an_integral_float_is_the_same_integer_and_nothing_else_changes():
    from newllm.train.config import TrainConfig

    cfg = TrainConfig.from_dict({"max_tokens": 1e6, "lr": 1, "data": {"bpe_vocab_size": 300}})
    assert cfg.max_tokens == 1_000_000 and isinstance(cfg.max_tokens, int) and cfg.lr == 1.0


@pytest.mark.parametrize("kw,needle", [
    (dict(hidden_size="64"), "hidden_size must be an integer, got '64'"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers must be an integer, got 2.5"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(hidden_size=30), "hidden_size 30 is not divisible by num_attention_heads 4"),
])
def test_create_model_checks_types(kw, needle):
    with pytest.raises(NewLLMError, match="create_model") as e:
        create_model("pythia", **{**TINY, **kw})
    assert needle in str(e.value)


def test_hf_yarn_rope_scaling_beside_plain_rope_parameters_is_refused(tmp_path):
    """transformers runs YaRN for such a file (its logits differ from plain RoPE by ~4e-3); newllm
    implements only plain RoPE, so it refuses the file rather than load it as plain RoPE."""
    from newllm import load_pretrained

    folder = hf_llama_folder(tmp_path / "hf", tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    with pytest.raises(NewLLMError, match=r"RoPE type 'yarn' is not supported \('rope_scaling'") as e:
        load_pretrained(folder)
    assert str(folder / "config.json") in str(e.value)


@pytest.mark.parametrize("key,value,needle", [
    ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false"),
    ("hidden_size", 32.5, "'hidden_size' must be an integer, got 32.5"),
    ("num_attention_heads", 0, "num_attention_heads must be > 0"),
    ("rms_norm_eps", "small", "'rms_norm_eps' must be a finite number"),
])
def test_hf_config_values_are_checked_not_coerced(tmp_path, key, value, needle):
    from newllm import load_pretrained

    folder = hf_llama_folder(tmp_path / "hf", **{"tie_word_embeddings": True, key: value})
    with pytest.raises(NewLLMError) as e:
        load_pretrained(folder)
    assert str(folder / "config.json") in str(e.value) and needle in str(e.value), str(e.value)


# ------------------------------------------------------------------ 5. lying headers
@pytest.fixture(scope="module")
def gguf_tensors():
    from tests.checkpoints.test_gguf import gguf_tensors, hf_tiny

    return gguf_tensors(hf_tiny(True))


def write_lying_gguf(path, tensors, **meta):
    from gguf import GGUFWriter

    from tests.checkpoints.test_gguf import MERGES, SPECIAL, TINY as G, TOKENS

    w = GGUFWriter(str(path), "llama")
    values = dict(block_count=G["layers"], context_length=G["ctx"], embedding_length=G["hidden"],
                  feed_forward_length=G["ff"], head_count=G["heads"], head_count_kv=G["kv_heads"],
                  rope_freq_base=G["theta"], layer_norm_rms_eps=G["eps"])
    values.update(meta)
    for key, value in values.items():
        full = f"llama.{key}" if key != "layer_norm_rms_eps" else "llama.attention.layer_norm_rms_epsilon"
        full = {"head_count": "llama.attention.head_count", "head_count_kv": "llama.attention.head_count_kv",
                "rope_freq_base": "llama.rope.freq_base"}.get(key, full)
        if isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        elif value < 0:
            w.add_int32(full, value)
        else:
            w.add_uint32(full, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types([3 if t in SPECIAL else 1 for t in TOKENS])
    for name, arr in tensors.items():
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("meta,needle", [
    (dict(block_count=20000), "declares 20000 layers, the file holds tensors for 2"),
    (dict(block_count=0), "declares 0 layers"),
    (dict(head_count=0), "'llama.attention.head_count' must be > 0, got 0"),
    (dict(head_count=-4), "'llama.attention.head_count' must be > 0, got -4"),
    (dict(head_count="four"), "'llama.attention.head_count' must be an integer, got 'four'"),
    (dict(head_count=5), "5 attention heads do not divide the embedding length 32"),
    (dict(embedding_length=4096), "has shape"),
    (dict(feed_forward_length=0), "intermediate_size must be > 0"),
    (dict(vocab_size=100000), "declares a vocabulary of 100000"),
    (dict(layer_norm_rms_eps=float("nan")), "must be a finite number"),
])
def test_gguf_header_is_checked_against_the_file_before_allocating(tmp_path, gguf_tensors, monkeypatch, meta, needle):
    import newllm.checkpoints.gguf as g

    def no_allocation(*a, **k):
        raise AssertionError("a model was allocated before the header was checked")

    monkeypatch.setattr(g, "TransformerLM", no_allocation)
    path = write_lying_gguf(tmp_path / "lie.gguf", gguf_tensors, **meta)
    with pytest.raises(NewLLMError) as e:
        g.load_gguf_model(path)
    assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_newllm_json_declaring_a_huge_model_fails_before_allocating(tmp_path, monkeypatch):
    import newllm.checkpoints.native as native

    folder = tmp_path / "m"
    save_model(create_model("pythia", **TINY), folder)
    edit_header(folder, lambda c: c.update(vocab_size=10**9))
    real = native.build_model

    def only_meta(config):
        assert torch.empty(0).device.type == "meta", "a model was allocated before the file was checked"
        return real(config)

    monkeypatch.setattr(native, "build_model", only_meta)
    with pytest.raises(NewLLMError, match=r"tensor embed.weight has shape \(300, 32\), the header's config needs "
                                          r"\(1000000000, 32\)"):
        load_model(folder)


# ------------------------------------------------------------------ 6. non-finite results are loud
@pytest.fixture
def nan_model_dir(tmp_path, tok):
    folder = tmp_path / "nan"
    torch.manual_seed(0)
    model = create_model("pythia", **{**TINY, "vocab_size": tok.vocab_size})
    with torch.no_grad():
        model.layers[0].mlp.dense_4h_to_h.weight[0, 0] = float("nan")
    save_model(model, folder)
    tok.save(folder / "tokenizer.json")
    return folder


def test_eval_ppl_of_a_nan_model_fails_loudly_and_writes_valid_json(nan_model_dir, text_file, tmp_path, capsys):
    argv = ["eval", "ppl", "--model", str(nan_model_dir), "--data", str(text_file), "--split", "test",
            "--context", "32", "--stride", "16", "--limit-tokens", "200", "--no-progress",
            "--cache-dir", str(tmp_path / "cache")]
    with pytest.warns(RuntimeWarning, match="not finite"):
        rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 1 and "newllm: error: the perplexity is not finite" in captured.err
    with pytest.warns(RuntimeWarning):
        rc = main([*argv, "--json"])
    out = strict_json(capsys.readouterr().out)
    assert rc == 1 and out["token_ppl"] is None and out["nonfinite"]["token_ppl"] == "nan"
    assert "not finite" in out["error"]


def test_labels_that_score_nothing_are_an_error_not_a_nan_loss(tiny_pythia):
    ids = torch.randint(0, 97, (2, 6))
    with pytest.raises(NewLLMError, match="leave no token to score"):
        tiny_pythia(ids, labels=torch.full_like(ids, -100))
    with pytest.raises(NewLLMError, match="leave no token to score"):
        tiny_pythia(ids[:, :1], labels=ids[:, :1])
    labels = torch.full_like(ids, -100)
    labels[0, 3] = ids[0, 3]
    assert torch.isfinite(tiny_pythia(ids, labels=labels).loss)


def test_dumps_json_is_valid_json_with_the_reason():
    text = dumps_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    out = strict_json(text)
    assert out == {"a": None, "b": [1.0, None], "c": {"d": None},
                   "nonfinite": {"a": "nan", "b[1]": "inf", "c.d": "-inf"}}


# ------------------------------------------------------------------ 7. resume robustness
def test_metrics_with_a_partial_last_line_resumes_with_a_warning(small_run, capsys):
    metrics = small_run / "metrics.jsonl"
    lines = metrics.read_text()
    metrics.write_text(lines + '{"kind": "train", "step": 3, "lo')
    with pytest.warns(RuntimeWarning, match="partial last line"):
        assert main(["train", "--resume", str(small_run), "--set", "max_steps=3", "--no-tensorboard"]) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_metrics_damaged_in_the_middle_is_a_one_line_error(small_run, capsys):
    metrics = small_run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    rc = main(["train", "--resume", str(small_run), "--set", "max_steps=3", "--no-tensorboard"])
    one_line_error(capsys, rc, f"{metrics}:2", "damaged")


@pytest.mark.parametrize("name", ["trainer.pt", "model.safetensors"])
def test_a_flipped_bit_in_a_checkpoint_fails_the_resume(small_run, capsys, name):
    f = small_run / "checkpoints" / "step-0000002" / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    rc = main(["train", "--resume", str(small_run), "--set", "max_steps=3"])
    one_line_error(capsys, rc, str(f), "sha256 check failed")


# ------------------------------------------------------------------ 8. memory states
def infini(seed: int):
    torch.manual_seed(seed)
    model = create_model("infini", **TINY, segment_length=8).eval()
    with torch.no_grad():
        model(torch.arange(20)[None] % 300, update_memory=True)
    return model


def test_a_state_from_other_weights_of_the_same_config_is_refused_unless_allowed(tmp_path):
    a, b = infini(0), infini(1)
    assert a.config.fingerprint() == b.config.fingerprint()
    save_memory_state(a.get_memory_state(), tmp_path / "a.safetensors")
    state = load_memory_state(tmp_path / "a.safetensors")
    with pytest.raises(NewLLMError, match="taken with other weights") as e:
        b.set_memory_state(state)
    assert "allow_weight_mismatch" in str(e.value)
    b.set_memory_state(state, allow_weight_mismatch=True)
    infini(0).set_memory_state(state)  # the same weights take it


def test_weights_fingerprint_follows_in_place_updates(tiny_pythia):
    from newllm.models.state import weights_fingerprint

    before = weights_fingerprint(tiny_pythia)
    assert weights_fingerprint(tiny_pythia) == before
    with torch.no_grad():
        tiny_pythia.lm_head.weight[0, 0] += 1.0
    assert weights_fingerprint(tiny_pythia) != before


def test_memory_cli_preset_is_seeded_and_check_accepts_a_mismatch_only_when_asked(tmp_path, text_file, tok, capsys):
    tokfile = tmp_path / "tok.json"
    tok.save(tokfile)
    outs = [tmp_path / "1.safetensors", tmp_path / "2.safetensors"]
    for out in outs:
        assert main(["memory", "save", "infini", "--text", str(text_file), "--tokenizer", str(tokfile),
                     "--out", str(out), "--max-tokens", "40"]) == 0
    assert load_memory_state(outs[0]).weights == load_memory_state(outs[1]).weights  # seeded: the same weights
    assert main(["memory", "check", str(outs[0]), "infini"]) == 0
    capsys.readouterr()
    one_line_error(capsys, main(["memory", "check", str(outs[0]), "infini", "--seed", "1"]), "other weights")
    assert main(["memory", "check", str(outs[0]), "infini", "--seed", "1", "--allow-weight-mismatch"]) == 0


def test_a_torch_saved_state_is_named_as_such(tmp_path):
    for f in (tmp_path / "memory.pt", tmp_path / "legacy.pt"):
        torch.save({"memory": torch.zeros(2, 2)}, f, _use_new_zipfile_serialization=f.name == "memory.pt")
        with pytest.raises(NewLLMError, match=r"torch\.save.*not a newllm memory state") as e:
            load_memory_state(f)
        assert str(f) in str(e.value) and "newllm memory save" in str(e.value)


def test_set_memory_state_refuses_what_is_not_a_state(tiny_pythia):
    for bad, needle in (({"0.memory": torch.zeros(1)}, "got a dict"), ("state", "got a str"),
                        ((torch.zeros(1), None), "entry 0 is a Tensor")):
        with pytest.raises(NewLLMError, match=needle):
            tiny_pythia.set_memory_state(bad)


# ------------------------------------------------------------------ 9. one line, not a traceback
def test_python_api_bad_input_is_one_line(tiny_pythia):
    with pytest.raises(NewLLMError, match=r"no tokens \(shape \(1, 0\)\)"):
        tiny_pythia(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(NewLLMError, match="at least one token"):
        tiny_pythia.generate(torch.zeros(1, 0, dtype=torch.long))
    for kw, needle in ((dict(do_sample=True, top_k=0), "top_k must be an integer >= 1"),
                       (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
                       (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
                       (dict(max_new_tokens=-1), "max_new_tokens")):
        with pytest.raises(NewLLMError, match=needle):
            tiny_pythia.generate(torch.ones(1, 3, dtype=torch.long), **kw)


def test_cli_bad_input_is_one_line(model_dir, text_file, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    facts = tmp_path / "facts"
    assert main(["eval", "reversal", "--generate", "3", "--out", str(facts)]) == 0
    capsys.readouterr()
    m = str(model_dir)
    cases = [
        (["eval", "ppl", "--model", m, "--data", str(text_file), "--context", "1", "--stride", "1",
          "--limit-tokens", "50", "--no-progress", "--cache-dir", str(tmp_path / "c")], "context must be >= 2"),
        (["generate", m, ""], "prompt: empty"),
        (["generate", m, "caf\udce9"], "not valid UTF-8"),
        (["generate", m, "hello", "--sample", "--top-k", "0"], "top_k must be an integer >= 1"),
        (["generate", m, "hello", "--sample", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["memory", "save", m, "--text", str(tmp_path), "--out", str(tmp_path / "x.safetensors")], "is a folder"),
        (["memory", "save", m, "--text", str(text_file), "--out", str(text_file / "x.safetensors")], "is not a folder"),
        (["eval", "reversal", "--model", m, "--train-file", str(empty), "--test-forward",
          str(facts / "test_forward.jsonl"), "--test-reverse", str(facts / "test_reverse.jsonl"),
          "--finetune-steps", "2"], "no examples to fine-tune on"),
        (["eval", "reversal", "--model", m, "--train-file", str(facts / "train.jsonl"), "--test-forward",
          str(facts / "test_forward.jsonl"), "--test-reverse", str(facts / "test_reverse.jsonl"),
          "--finetune-steps", "2", "--lr", "nan"], "--lr must be a finite number > 0"),
        (["eval", "reversal", "--generate", "3", "--out", str(facts)], "already holds train.jsonl"),
    ]
    for argv, needle in cases:
        one_line_error(capsys, main(argv), needle)


def test_recipe_type_errors_are_one_line_in_the_cli(tmp_path, text_file, capsys):
    for field, value, needle in (("batch_size", 2.5, "batch_size must be an integer"), ("device", "tpu", "'tpu'"),
                                 ("num_threads", "many", "num_threads")):
        path = recipe(tmp_path, text_file, **{field: value})
        one_line_error(capsys, main(["train", "--config", str(path)]), str(path), needle)


# ------------------------------------------------------------------ 10. smaller items
def test_generate_stops_at_end_of_turn_and_prints_no_special_tokens():
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    from newllm.data.tokenizer import Tokenizer

    backend = HF(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|im_end|>", "<|endoftext|>"])
    tok = Tokenizer(backend, "t", eos_token="<|endoftext|>")
    im_end = backend.token_to_id("<|im_end|>")
    assert set(tok.stop_token_ids()) == {im_end, backend.token_to_id("<|endoftext|>")}
    assert tok.decode([0, im_end, 1], skip_special_tokens=True) == "a b"
    torch.manual_seed(0)
    model = create_model("pythia", **{**TINY, "vocab_size": 5}).eval()
    with torch.no_grad():  # a model that always says <|im_end|>: the final norm outputs ones, only its row scores
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[im_end] = 1.0
    out = model.generate(torch.tensor([[0, 1]]), max_new_tokens=10, eos_token_id=tok.stop_token_ids())
    assert out[0, 2:].tolist() == [im_end]


def test_progress_bars_stay_quiet_when_stderr_is_not_a_terminal(tiny_pythia, capsys):
    from newllm.eval.perplexity import sliding_window_perplexity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sliding_window_perplexity(tiny_pythia, torch.arange(60) % 97, context=16, stride=8, progress=True)
    assert "\r" not in capsys.readouterr().err


def test_model_loading_says_so_on_a_terminal(monkeypatch, capsys):
    import sys

    from newllm.cli.generate import load_with_note

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    load_with_note("pythia", **{k: v for k, v in TINY.items()})
    assert "loading pythia" in capsys.readouterr().err


# ------------------------------------------------------------------ the checks hold for every layer type
@pytest.mark.parametrize("case", sorted(__import__("tests.models.test_conformance", fromlist=["CASES"]).CASES))
def test_every_model_reloads_through_the_strict_path_and_meta_shapes_match(tmp_path, case):
    """Every registered layer type and preset: the meta-device shapes the loaders check files against
    equal the real model's, and a saved folder loads back through the strict (require=True) path."""
    from newllm.checkpoints.native import expected_shapes
    from tests.models.test_conformance import build

    model = build(case).eval()
    assert expected_shapes(model.config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m").eval()
    ids = torch.arange(12)[None] % model.config.vocab_size
    torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
