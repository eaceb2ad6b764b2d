"""Property-based fuzzing (hypothesis) of everything newllm reads: config dicts and YAML recipes,
GGUF headers, newllm.json headers, reversal JSONL and command lines.

The property, for every input: the result is a loaded object whose declared values are exactly the
ones given, or a one-line `NewLLMError` that names the file (or section) and starts with it. Never
another exception, never a silent change of a declared value, and never an allocation beyond what
the file can back (the model constructors are wrapped to check the bytes they would allocate).
docs/reliability.md lists the classes and counts; each property's example count is its
`max_examples` (modest, so the suite stays fast; raise them locally to fuzz longer).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import unittest.mock
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from newllm import NewLLMError, create_model
from newllm.checkpoints.native import save_model

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True, database=None)  # derandomized: CI sees the same examples every run


def fuzz(max_examples: int) -> settings:
    """`max_examples` examples (times $NEWLLM_FUZZ_SCALE, for a longer local run; random when scaled)."""
    scale = int(os.environ.get("NEWLLM_FUZZ_SCALE", "1"))
    return settings(FUZZ, max_examples=max_examples * scale, derandomize=scale == 1)
TMP = Path(tempfile.mkdtemp(prefix="newllm-fuzz-"))
TINY = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=2)

# any JSON/YAML value, weighted towards the ones a typo or a hostile file gives
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2**40, 2**40), st.sampled_from([0, 1, 2, 16, 64, 300]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e-3, 64.0, 64.5, 1e6]),
    st.text(max_size=8), st.sampled_from(["false", "true", "64", "auto", "cpu", "tpu", "valid", "nan", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                              max_size=3), max_leaves=6)


#: outcomes per input class ({class: {"loaded" | "refused" | ...: n}}), written to $NEWLLM_FUZZ_STATS
#: (a JSON file) at the end of the module: the counts of docs/reliability.md's table
STATS: dict[str, dict[str, int]] = {}


def record(kind: str, outcome: str) -> None:
    STATS.setdefault(kind, {}).setdefault(outcome, 0)
    STATS[kind][outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def write_stats():
    yield
    if os.environ.get("NEWLLM_FUZZ_STATS"):
        Path(os.environ["NEWLLM_FUZZ_STATS"]).write_text(json.dumps(STATS, indent=1, sort_keys=True))


def assert_one_line(e: NewLLMError, where: str) -> None:
    msg = str(e)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{where}:") or msg.startswith(where), msg


def same(given_value, loaded) -> bool:
    """`loaded` is `given_value` unchanged: the same bool, string or number (an int may load as the
    equal float of a float field, an integral float as the equal int), lists and mappings item by item."""
    if isinstance(given_value, bool) or isinstance(loaded, bool):
        return type(given_value) is type(loaded) and given_value == loaded
    if isinstance(given_value, (int, float)) and isinstance(loaded, (int, float)):
        return given_value == loaded
    if isinstance(given_value, (list, tuple)) and isinstance(loaded, (list, tuple)):
        return len(given_value) == len(loaded) and all(same(a, b) for a, b in zip(given_value, loaded))
    if isinstance(given_value, dict) and isinstance(loaded, dict):
        return given_value.keys() == loaded.keys() and all(same(given_value[k], loaded[k]) for k in given_value)
    return type(given_value) is type(loaded) and given_value == loaded


# ------------------------------------------------------------------ config dicts and YAML
TRAIN_KEYS = ["seq_len", "batch_size", "grad_accum", "max_steps", "max_tokens", "max_minutes", "lr", "min_lr",
              "warmup_steps", "weight_decay", "betas", "eps", "grad_clip", "amp", "on_nonfinite", "log_every",
              "checkpoint_every", "keep_checkpoints", "progress", "mode", "device", "num_threads", "seed", "run_dir",
              "param_groups", "max_nonfinite_skips"]
SECTIONS = {"eval": ["every", "context", "stride", "batch_size", "max_tokens", "final_splits"],
            "data": ["corpus", "tokenizer", "bpe_vocab_size", "bpe_min_frequency", "train_split", "valid_split"],
            "model": ["preset", "overrides"]}


count = st.integers(1, 64) | st.integers(1, 64).map(float)  # an integral float is the same count
small = st.floats(1e-6, 1.0)
#: values a real recipe would hold, so that many examples load and "no silent change" is exercised
PLAUSIBLE = {
    **{k: count for k in ("seq_len", "batch_size", "grad_accum", "max_steps", "warmup_steps", "log_every",
                          "checkpoint_every", "keep_checkpoints", "max_nonfinite_skips", "seed")},
    "max_tokens": st.integers(1, 10**7) | st.sampled_from([1e6, 2.5e5]), "max_minutes": st.floats(0.01, 1e3),
    "lr": st.floats(1e-3, 1.0), "min_lr": st.floats(0.0, 1e-3), "weight_decay": st.floats(0.0, 1.0),
    "eps": small, "grad_clip": small | st.none(), "betas": st.lists(st.floats(0.0, 0.999), min_size=2, max_size=2),
    "amp": st.sampled_from(["none", "bf16", "fp16"]), "on_nonfinite": st.sampled_from(["stop", "skip"]),
    "mode": st.sampled_from(["parallel", "sequential", "lct"]), "progress": st.booleans(),
    "device": st.sampled_from(["auto", "cpu", "cuda:0"]), "num_threads": st.integers(1, 8) | st.none(),
    "run_dir": st.text(min_size=1, max_size=8), "param_groups": st.just({}) | st.just({"gates": {"lr": 1e-2}}),
    "every": st.integers(0, 100), "context": st.integers(16, 512), "stride": st.integers(1, 16),
    "final_splits": st.lists(st.sampled_from(["valid", "test"]), max_size=2),
    "corpus": st.text(min_size=1, max_size=8), "tokenizer": st.none(), "bpe_vocab_size": st.integers(257, 10**4),
    "bpe_min_frequency": st.integers(1, 5), "train_split": st.sampled_from(["train", "all"]),
    "valid_split": st.sampled_from(["valid", "test"]), "preset": st.sampled_from(["pythia", "infini"]),
    "overrides": st.just({}),
}


def value_for(key: str):
    """Half the time a plausible value of the key, half the time any value at all."""
    return st.one_of(PLAUSIBLE.get(key, values), values)


@st.composite
def train_dicts(draw):
    d = {"max_steps": 10, "data": {"bpe_vocab_size": 300}}
    for key in draw(st.lists(st.sampled_from(TRAIN_KEYS + ["typo_key"]), max_size=4, unique=True)):
        d[key] = draw(value_for(key))
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=2, unique=True)):
        sub = dict(d.get(section, {}))
        for key in draw(st.lists(st.sampled_from(SECTIONS[section] + ["typo"]), min_size=1, max_size=3, unique=True)):
            sub[key] = draw(value_for(key))
        d[section] = draw(st.sampled_from([sub, sub, draw(values)]))  # sometimes not a mapping at all
    return d


def check_train_config(d, where, kind="config dicts"):
    from newllm.train.config import TrainConfig

    try:
        cfg = TrainConfig.from_dict(d, where=where)
    except NewLLMError as e:
        assert_one_line(e, where)
        record(kind, "refused")
        return None
    record(kind, "loaded")
    for key, value in d.items():  # no silent change of a declared value
        if key in SECTIONS:
            for sub, v in value.items():
                if not (key == "model" and sub == "overrides"):
                    assert same(v, getattr(getattr(cfg, key), sub)), (key, sub, v)
        else:
            assert same(value, getattr(cfg, key)), (key, value, getattr(cfg, key))
    return cfg


@fuzz(200)
@given(train_dicts())
def test_fuzz_train_config_dicts(d):
    check_train_config(d, "fuzz.yaml")


@fuzz(100)
@given(train_dicts(), st.sampled_from(["as-is", "cut", "garbage", "tabs"]), st.binary(max_size=12))
def test_fuzz_train_config_yaml(d, mutation, noise):
    from newllm.train.config import load_config

    try:
        text = yaml.safe_dump(d, allow_unicode=True)
    except yaml.YAMLError:
        return
    raw = text.encode()
    if mutation == "cut":
        raw = raw[: len(raw) // 2]
    elif mutation == "garbage":
        raw = raw + noise
    elif mutation == "tabs":
        raw = raw.replace(b"  ", b"\t")
    path = TMP / "recipe.yaml"
    path.write_bytes(raw)
    try:
        cfg = load_config(path)
    except NewLLMError as e:
        assert_one_line(e, str(path))
        record("YAML recipes", "refused")
        return
    record("YAML recipes", "loaded")
    if mutation == "as-is":
        check_train_config(d, str(path), kind="YAML recipes (re-read as dicts)")
    assert cfg.seq_len > 0 and cfg.lr > 0 and math.isfinite(cfg.lr)


@fuzz(100)
@given(st.sampled_from(["pythia", "llama", "infini", "multi_memory", "hierarchical"]),
       st.dictionaries(st.sampled_from(["hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                                        "tie_word_embeddings", "norm_eps", "segment_length", "num_key_value_heads",
                                        "rotary_pct", "vocab_size", "typo"]), scalars, max_size=3))
def test_fuzz_create_model_overrides(preset, overrides):
    from newllm.models.presets import preset_config

    base = dict(vocab_size=32, hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=2)
    if preset != "pythia" and preset != "llama":
        base["segment_length"] = 4
    if preset == "llama":
        base["num_key_value_heads"] = 1
    kw = {**base, **overrides}
    if isinstance(kw.get("vocab_size"), int) and kw["vocab_size"] > 10**6:  # a legal but huge model: not built here
        kw["vocab_size"] = 10**6
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        if isinstance(kw.get(key), (int, float)) and not isinstance(kw[key], bool) and kw[key] > 256:
            kw[key] = 256
    try:
        config = preset_config(preset, **kw)
    except NewLLMError as e:
        assert_one_line(e, f"create_model({preset!r})")
        record("create_model overrides", "refused")
        return
    record("create_model overrides", "loaded")
    layer0 = config.layers[0]
    for key, value in kw.items():
        if key == "num_hidden_layers":
            assert config.num_hidden_layers == value
        elif value is None:
            continue  # null: derived from the other fields
        elif key in layer0:
            assert same(value, layer0[key]), (key, value, layer0[key])
        elif hasattr(config, key):
            assert same(value, getattr(config, key)), (key, value)


# ------------------------------------------------------------------ newllm.json headers
@pytest.fixture(scope="module")
def saved_model():
    torch.manual_seed(0)
    folder = TMP / "model"
    save_model(create_model("infini", **TINY, segment_length=4), folder)
    return folder


MODEL_KEYS = ["vocab_size", "norm", "norm_eps", "tie_word_embeddings", "max_position_embeddings", "bos_token_id",
              "eos_token_id", "dtype", "layers", "context_feedback", "typo"]
LAYER_KEYS = ["type", "hidden_size", "num_attention_heads", "intermediate_size", "segment_length", "use_delta_rule",
              "memory_head_dim", "gate_init", "rotary_pct", "sliding_window", "attention_sinks", "typo"]


@st.composite
def header_edits(draw):
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["model", "layer", "delete-model", "delete-layer", "top"]))
        if where in ("model", "delete-model"):
            edits.append((where, draw(st.sampled_from(MODEL_KEYS)), draw(values)))
        elif where == "top":
            edits.append((where, draw(st.sampled_from(["format", "version", "config"])), draw(values)))
        else:
            edits.append((where, (draw(st.integers(0, 2)), draw(st.sampled_from(LAYER_KEYS))), draw(values)))
    return edits


@contextlib.contextmanager
def bytes_guard(module, name, limit_bytes):
    """Within the block, `module.name` (a model constructor) fails the test when it would build more
    parameter bytes than `limit_bytes`: a header must never make newllm allocate what its file
    cannot back. (A context manager, not monkeypatch: hypothesis runs many examples in one test.)"""
    from newllm.checkpoints.native import expected_shapes

    real = getattr(module, name)

    def guarded(*args, **kwargs):
        config = kwargs.get("config", args[0] if args else None)
        if config is not None and torch.empty(0).device.type != "meta":
            with unittest.mock.patch.object(module, name, real):
                need = sum(int(np.prod(s)) for s in expected_shapes(config).values()) * 4
            assert need <= limit_bytes, f"would allocate {need:,} bytes for a {limit_bytes:,}-byte file"
        return real(*args, **kwargs)

    with unittest.mock.patch.object(module, name, guarded):
        yield


@fuzz(150)
@given(edits=header_edits())
def test_fuzz_newllm_json(saved_model, edits):
    import newllm.checkpoints.native as native

    folder = TMP / "edited"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes((saved_model / "model.safetensors").read_bytes())
    header = json.loads((saved_model / "newllm.json").read_text())
    for kind, key, value in edits:
        cfg = header.get("config") if isinstance(header.get("config"), dict) else None
        if kind == "top":
            header[key] = value
        elif cfg is None:
            continue
        elif kind == "model":
            cfg[key] = value
        elif kind == "delete-model":
            cfg.pop(key, None)
        else:
            i, k = key
            layers = cfg.get("layers")
            if isinstance(layers, list) and i < len(layers) and isinstance(layers[i], dict):
                layers[i].pop(k, None) if kind == "delete-layer" else layers[i].__setitem__(k, value)
    try:
        text = json.dumps(header)
    except (ValueError, TypeError):
        return
    (folder / "newllm.json").write_text(text)
    try:
        with bytes_guard(native, "build_model", 4 * (folder / "model.safetensors").stat().st_size):
            model = native.load_model(folder)
    except NewLLMError as e:
        assert_one_line(e, str(folder))
        record("newllm.json headers", "refused")
        return
    record("newllm.json headers", "loaded")
    cfg = header["config"]
    for key, value in cfg.items():  # what loaded is what the header declares
        if key != "layers":
            assert same(value, getattr(model.config, key)), (key, value)
    for spec, loaded in zip(cfg["layers"], model.config.layers):
        for key, value in spec.items():
            if value is not None:  # null: derived from the other fields (head_dim, kv heads)
                assert same(value, loaded[key]), (key, value, loaded[key])


# ------------------------------------------------------------------ GGUF headers written with gguf
@pytest.fixture(scope="module")
def gguf_base():
    from tests.checkpoints.test_gguf import gguf_tensors, hf_tiny

    return gguf_tensors(hf_tiny(True))


GGUF_KEYS = ["block_count", "context_length", "embedding_length", "feed_forward_length", "head_count",
             "head_count_kv", "rope_freq_base", "layer_norm_rms_eps", "vocab_size"]
#: the valid header's values (what the tensors agree with): half the fuzzed values are these
GGUF_TRUE = dict(block_count=2, context_length=128, embedding_length=32, feed_forward_length=64, head_count=4,
                 head_count_kv=2, rope_freq_base=50000.0, layer_norm_rms_eps=1e-6, vocab_size=279)
gguf_values = st.one_of(st.integers(-5, 40), st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 2, 4, 32, 64, 20000]),
                        st.floats(allow_nan=True, allow_infinity=True, width=32), st.text(max_size=6))


@fuzz(80)
@given(st.lists(st.sampled_from(GGUF_KEYS), max_size=3, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.just(GGUF_TRUE[k]) | gguf_values for k in keys})),
       st.sampled_from(["all", "drop-one-layer", "drop-output-norm"]))
def test_fuzz_gguf_header(gguf_base, meta, tensors_kind):
    import newllm.checkpoints.gguf as g
    from tests.test_reliability import write_lying_gguf

    meta = {k: v for k, v in meta.items() if v != ""}  # the gguf writer skips an empty string: the key is absent
    tensors = dict(gguf_base)
    if tensors_kind == "drop-one-layer":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("blk.1.")}
    elif tensors_kind == "drop-output-norm":
        tensors.pop("output_norm.weight")
    path = TMP / "fuzz.gguf"
    g._reader_cache.clear()
    try:
        write_lying_gguf(path, tensors, **meta)
    except (ValueError, OverflowError, TypeError, AssertionError):
        record("GGUF headers", "not writable by gguf")
        return  # the writer itself refuses the value: nothing to read
    try:
        with bytes_guard(g, "TransformerLM", 4 * path.stat().st_size):
            model = g.load_gguf_model(path)
    except NewLLMError as e:
        assert_one_line(e, str(path))
        record("GGUF headers", "refused")
        return
    record("GGUF headers", "loaded")
    layer = model.config.layers[0]
    for key, ours in (("embedding_length", layer["hidden_size"]), ("head_count", layer["num_attention_heads"]),
                      ("feed_forward_length", layer["intermediate_size"]), ("block_count", model.config.num_hidden_layers),
                      ("rope_freq_base", layer["rope_theta"]), ("vocab_size", model.config.vocab_size),
                      ("context_length", model.config.max_position_embeddings)):
        if key in meta:
            declared = float(np.float32(meta[key])) if isinstance(meta[key], float) else meta[key]  # stored as f32
            assert ours == declared, (key, meta[key], ours)


# ------------------------------------------------------------------ reversal JSONL
jsonl_lines = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=10), "completion": st.text(max_size=10)},
                          optional={"fact": values, "extra": values}).map(json.dumps),
    st.dictionaries(st.sampled_from(["prompt", "completion", "fact"]), values, max_size=3).map(
        lambda d: json.dumps(d) if all(not isinstance(v, float) or math.isfinite(v) for v in d.values()) else "{}"),
    values.map(lambda v: json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else "1"),
    st.text(max_size=20).filter(lambda s: "\n" not in s and "\r" not in s),
)


@fuzz(200)
@given(st.lists(jsonl_lines, max_size=6), st.binary(max_size=4))
def test_fuzz_reversal_jsonl(lines, tail):
    from newllm.data.reversal import read_jsonl

    path = TMP / "facts.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + tail)
    try:
        examples = read_jsonl(path)
    except NewLLMError as e:
        assert_one_line(e, str(path))
        record("reversal JSONL", "refused")
        return
    record("reversal JSONL", "loaded")
    objs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [(ex.prompt, ex.completion) for ex in examples] == [(o["prompt"], o["completion"]) for o in objs]


# ------------------------------------------------------------------ command lines
@pytest.fixture(scope="module")
def cli_model(shared_dir):
    from newllm.data.bpe import train_bpe

    text = (shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:5000]
    tok = train_bpe([text], 300)
    folder = TMP / "cli-model"
    torch.manual_seed(0)
    save_model(create_model("infini", **{**TINY, "vocab_size": tok.vocab_size}, segment_length=4), folder)
    tok.save(folder / "tokenizer.json")
    (TMP / "text.txt").write_text(text)
    return folder


flag_values = st.one_of(st.integers(-3, 5).map(str), st.sampled_from(["0", "1", "2", "1.5", "nan", "inf", "-1", "",
                                                                       "abc", "1e9"]), st.text(max_size=4))


@st.composite
def argvs(draw, model: str):
    text, out = str(TMP / "text.txt"), str(TMP / "cli-out.safetensors")
    kind = draw(st.sampled_from(["generate", "ppl", "memory-save", "memory-info", "info", "train-set"]))
    if kind == "generate":
        argv = ["generate", model, draw(st.one_of(st.text(max_size=6), st.just("\udcff")))]
        flags = ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"]
        if draw(st.booleans()):
            argv.append("--sample")
    elif kind == "ppl":
        argv = ["eval", "ppl", "--model", model, "--data", text, "--no-progress", "--cache-dir", str(TMP / "cache")]
        flags = ["--context", "--stride", "--batch-size", "--limit-tokens"]
    elif kind == "memory-save":
        argv = ["memory", "save", model, "--text", draw(st.sampled_from([text, str(TMP), str(TMP / "missing.txt")])),
                "--out", draw(st.sampled_from([out, str(TMP), str(TMP / "text.txt" / "x")])), "--force"]
        flags = ["--max-tokens", "--chunk"]
    elif kind == "memory-info":
        argv = ["memory", "info", draw(st.sampled_from([out, text, str(TMP), str(model) + "/model.safetensors"]))]
        flags = []
    elif kind == "info":
        argv = ["info", draw(st.sampled_from([model, text, str(TMP / "nothing"), "pythia-typo"]))]
        flags = []
    else:
        argv = ["train", "--config", str(TMP / "never-read.yaml")]
        flags = []
        for _ in range(draw(st.integers(1, 3))):
            keys = [k for k in TRAIN_KEYS if k != "run_dir"] + ["eval.every", "data.bpe_vocab_size"]
            argv += ["--set", f"{draw(st.sampled_from(keys))}="
                              f"{draw(flag_values)}"]
    for flag in draw(st.lists(st.sampled_from(flags), max_size=3, unique=True)) if flags else []:
        argv += [flag, draw(flag_values)]
    return argv


@fuzz(120)
@given(data=st.data())
def test_fuzz_cli_arguments(cli_model, capsys, data):
    import warnings

    from newllm.cli import main

    (TMP / "never-read.yaml").write_text(f"max_steps: 1\nrun_dir: {TMP / 'run'}\n"
                                         "data: {bpe_vocab_size: 300, corpus: /nonexistent}\n")
    argv = data.draw(argvs(str(cli_model)))
    if "--limit-tokens" not in argv and argv[:2] == ["eval", "ppl"]:
        argv += ["--limit-tokens", "200"]
    if argv[:1] == ["generate"] and "--max-new-tokens" in argv:  # keep each run short
        i = argv.index("--max-new-tokens") + 1
        argv[i] = argv[i] if argv[i].lstrip("-").isdigit() and int(argv[i]) <= 5 else argv[i][:1]
    threads = torch.get_num_threads()  # `train --set num_threads=N` sets it for the whole process
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(argv)
    except SystemExit as e:  # argparse's own usage error (a bad flag type): exit status 2, its usage text
        assert e.code == 2, argv
        capsys.readouterr()
        record("command lines", "argparse usage error")
        return
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    if rc != 0:
        assert rc in (1, 2) and err.strip().startswith("newllm: error: ") and err.count("\n") == 1, (argv, err)
    record("command lines", "ran" if rc == 0 else f"one-line error (exit {rc})")
