"""Hugging Face folders (GPT-NeoX, Llama, Mistral) load with the logits of `transformers`.

Tiny random models are built with `transformers` and written with `save_pretrained` (offline); every
weight, norms included, is randomised at a scale where a wrong rotary split, residual order, head
grouping or epsilon moves the logits by far more than the tolerance (1e-4, fp32).
"""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers  # dev dependency: the reference implementation
from safetensors.torch import load_file, save_file

import newllm
from newllm import NewLLMError
from newllm.checkpoints.hf import hf_config, hf_to_ours, ours_to_hf

V, T = 113, 19  # vocabulary and prompt length of the tiny models
ATOL = 1e-4


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """All weights ~ N(0, 0.15^2), norm scales ~ 1 + N(0, 0.1^2): logits of order 1-10, not 1e-2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.15 * noise)
    return model.eval()


def neox(rotary_pct=0.25, parallel=True, tied=False, seed=0):
    cfg = transformers.GPTNeoXConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        rotary_pct=rotary_pct, rotary_emb_base=500.0, use_parallel_residual=parallel, layer_norm_eps=1e-3,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, dtype="float32")
    torch.manual_seed(seed)
    return randomise(transformers.GPTNeoXForCausalLM(cfg), seed)


def llama(gqa=True, tied=False, seed=0, cls="Llama", **kw):
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4, intermediate_size=48, rope_theta=300.0, rms_norm_eps=1e-3,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, dtype="float32", **kw)
    torch.manual_seed(seed)
    return randomise(getattr(transformers, f"{cls}ForCausalLM")(cfg), seed)


def ids(batch=2, length=T, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours, ref, x, atol=ATOL):
    with torch.no_grad():
        a, b = ours(x).logits, ref(x).logits
    assert b.abs().max() > 1.0  # the check is not vacuous: logits are far from 0
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max |logit diff| {diff:.3g} > {atol}"


def saved(ref, folder):
    ref.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ logit parity
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("rotary_pct", [0.0, 0.25, 1.0], ids=["rot0", "rot25", "rot100"])
def test_gpt_neox_logits_equal_transformers(tmp_path, rotary_pct, parallel):
    ref = neox(rotary_pct, parallel)
    model = newllm.load_pretrained(saved(ref, tmp_path), dtype=torch.float32)
    layer = model.config.layers[0]
    assert (layer["type"], layer["rotary_pct"], layer["use_parallel_residual"]) == ("pythia", rotary_pct, parallel)
    assert layer["rotary_emb_base"] == 500.0 and layer["layer_norm_eps"] == 1e-3
    assert_same_logits(model, ref, ids())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_llama_logits_equal_transformers(tmp_path, gqa, tied):
    ref = llama(gqa, tied)
    model = newllm.load_pretrained(saved(ref, tmp_path), dtype=torch.float32)
    assert model.config.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.embed.weight) == tied
    assert model.config.layers[0]["num_key_value_heads"] == (2 if gqa else 4)
    assert_same_logits(model, ref, ids())


def test_gpt_neox_tied_embeddings(tmp_path):
    ref = neox(tied=True)
    model = newllm.load_pretrained(saved(ref, tmp_path), dtype=torch.float32)
    assert model.lm_head.weight is model.embed.weight
    assert_same_logits(model, ref, ids())


def test_mistral_sliding_window_equals_transformers(tmp_path):
    """Mistral = Llama + a sliding window; 5 keys per query over 19 tokens exercises the window."""
    ref = llama(cls="Mistral", sliding_window=5, head_dim=8)
    ref.config._attn_implementation = "sdpa"
    model = newllm.load_pretrained(saved(ref, tmp_path), dtype=torch.float32)
    assert model.config.layers[0]["sliding_window"] == 5
    assert_same_logits(model, ref, ids())


def test_sharded_safetensors(tmp_path):
    ref = neox()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert_same_logits(newllm.load_pretrained(tmp_path, dtype=torch.float32), ref, ids())


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
def test_pytorch_model_bin(tmp_path, zip_format):
    """A pickle-format folder (written by hand: transformers 5 always writes safetensors, and its
    in-memory head name is lm_head) loads with weights_only=True, including the non-weight buffers
    that old Pythia checkpoints carry."""
    ref = neox(rotary_pct=0.5)
    ref.config.save_pretrained(tmp_path)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["gpt_neox.layers.0.attention.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
    sd["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    sd["gpt_neox.layers.1.attention.rotary_emb.inv_freq"] = torch.ones(2)
    torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    assert_same_logits(newllm.load_pretrained(tmp_path, dtype=torch.float32), ref, ids())


def test_dtype_choices(tmp_path):
    ref = llama()
    folder = saved(ref, tmp_path)
    assert newllm.load_pretrained(folder).embed.weight.dtype == torch.float32  # default
    assert newllm.load_pretrained(folder, dtype=torch.bfloat16).embed.weight.dtype == torch.bfloat16
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "dtype": "float16"}))
    assert newllm.load_pretrained(folder, dtype="auto").embed.weight.dtype == torch.float16


# ------------------------------------------------------------------ config reading
def write_config(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


NEOX_OLD = dict(model_type="gpt_neox", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64)


@pytest.mark.parametrize("fields, rotary_pct, base", [
    (dict(rotary_pct=0.5, rotary_emb_base=123.0), 0.5, 123.0),  # transformers 4 spelling
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5, "rope_theta": 77.0},
          rotary_pct=0.25, rotary_emb_base=1.0), 0.5, 77.0),  # rope_parameters wins over the old keys
    ({}, 0.25, 10000.0),  # transformers' GPTNeoXConfig defaults
    (dict(rotary_pct=0.0), 0.0, 10000.0),  # 0 is a value (no RoPE), not "missing"
], ids=["v4-keys", "v5-rope_parameters", "defaults", "no-rope"])
def test_gpt_neox_rope_keys(tmp_path, fields, rotary_pct, base):
    layer = hf_config(write_config(tmp_path, **NEOX_OLD, **fields)).layers[0]
    assert (layer["rotary_pct"], layer["rotary_emb_base"]) == (rotary_pct, base)


def test_llama_config_keys(tmp_path):
    cfg = hf_config(write_config(tmp_path, model_type="llama", vocab_size=V, hidden_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=32, intermediate_size=80,
                                 rope_theta=5e5, attention_bias=True, mlp_bias=True, eos_token_id=[7, 9],
                                 bos_token_id=None, max_position_embeddings=4096))
    layer = cfg.layers[0]
    assert (layer["num_key_value_heads"], layer["head_dim"], layer["rope_theta"]) == (1, 32, 5e5)
    assert (layer["attention_bias"], layer["mlp_bias"], layer["rms_norm_eps"]) == (True, True, 1e-6)
    assert (cfg.eos_token_id, cfg.bos_token_id, cfg.max_position_embeddings) == (7, None, 4096)
    assert (cfg.norm, cfg.num_hidden_layers, cfg.tie_word_embeddings) == ("rmsnorm", 3, False)


def test_name_mapping_round_trips(tmp_path):
    for model_type, ref in (("gpt_neox", neox()), ("llama", llama())):
        names = load_file(str(saved(ref, tmp_path / model_type) / "model.safetensors"))  # on-disk names
        assert len(names) == len(ref.state_dict())
        for name in names:
            ours = hf_to_ours(name, model_type)
            assert ours is not None and ours_to_hf(ours, model_type) == name
    assert hf_to_ours("lm_head.weight", "gpt_neox") == "lm_head.weight"  # transformers 5's in-memory name
    assert hf_to_ours("layers.0.attention.dense.bias", "gpt_neox") == "layers.0.attention.dense.bias"  # bare base model


# ------------------------------------------------------------------ generation
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_greedy_generate_equals_transformers(tmp_path, arch):
    ref = neox() if arch == "gpt_neox" else llama()
    model = newllm.load_pretrained(saved(ref, tmp_path), dtype=torch.float32)
    prompt = ids(batch=1, length=7, seed=3)
    want = ref.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                        attention_mask=torch.ones_like(prompt))
    got = model.generate(prompt, max_new_tokens=24)
    assert got.shape == want.shape == (1, 31)
    assert got.tolist() == want.tolist()


# ------------------------------------------------------------------ one-line errors
@pytest.fixture(scope="module")
def neox_source(tmp_path_factory):
    return saved(neox(), tmp_path_factory.mktemp("neox-src"))


@pytest.fixture
def neox_files(neox_source):
    """A valid folder's (config dict, tensors dict), fresh for each error case to break."""
    return json.loads((neox_source / "config.json").read_text()), load_file(str(neox_source / "model.safetensors"))


def write(tmp_path, config, tensors):
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def _unknown_arch(c, t):
    c["model_type"] = "gpt2"


def _missing(c, t):
    del t["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]


def _shape(c, t):
    t["gpt_neox.layers.0.attention.dense.weight"] = t["gpt_neox.layers.0.attention.dense.weight"][:, :16].contiguous()


def _unexpected(c, t):
    t["gpt_neox.layers.0.attention.lora_A.weight"] = torch.zeros(2, 2)


def _extra_layer(c, t):
    t["gpt_neox.layers.2.input_layernorm.weight"] = torch.zeros(32)


def _missing_head(c, t):
    del t["embed_out.weight"]


def _rope_scaling(c, t):
    c["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


def _no_hidden_size(c, t):
    del c["hidden_size"]


def _bad_act(c, t):
    c["hidden_act"] = "swish_xyz"


ERRORS = {
    "unknown-architecture": (_unknown_arch, r"config\.json: model_type 'gpt2' is not supported"),
    "missing-tensor": (_missing, r"missing tensor\(s\) \['gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.weight'\]"
                                 r" \(not in model\.safetensors\)"),
    "shape-mismatch": (_shape, r"model\.safetensors: tensor gpt_neox\.layers\.0\.attention\.dense\.weight has "
                               r"shape \(32, 16\), the model expects \(32, 32\)"),
    "unexpected-tensor": (_unexpected, r"model\.safetensors: unexpected tensor gpt_neox\.layers\.0\.attention\."
                                       r"lora_A\.weight"),
    "extra-layer": (_extra_layer, r"unexpected tensor gpt_neox\.layers\.2\.input_layernorm\.weight \(not part of "
                                  r"a 2-layer gpt_neox model\)"),
    "untied-head-missing": (_missing_head, r"missing tensor\(s\) \['embed_out\.weight'\]"),
    "rope-scaling": (_rope_scaling, r"config\.json: RoPE type 'linear' is not supported"),
    "config-key-missing": (_no_hidden_size, r"config\.json: no 'hidden_size'"),
    "hidden-act": (_bad_act, r"config\.json: hidden_act 'swish_xyz' is not supported"),
}


def assert_one_line_error(folder, pattern):
    with pytest.raises(NewLLMError) as e:
        newllm.load_pretrained(folder)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert re.search(pattern, msg), msg
    assert str(folder) in msg  # names the file or folder


@pytest.mark.parametrize("case", list(ERRORS))
def test_one_line_errors(tmp_path, neox_files, case):
    config, tensors = neox_files
    breaker, pattern = ERRORS[case]
    breaker(config, tensors)
    assert_one_line_error(write(tmp_path, config, tensors), pattern)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(tmp_path, neox_files, damage):
    config, tensors = neox_files
    write(tmp_path, config, tensors)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    assert_one_line_error(tmp_path, r"model\.safetensors: not a readable safetensors file")


def test_corrupt_pytorch_bin(tmp_path, neox_files):
    config, _ = neox_files
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    assert_one_line_error(tmp_path, r"pytorch_model\.bin: not a readable PyTorch weights file")


def test_pickle_with_code_is_refused(tmp_path, neox_files):
    """weights_only=True: a .bin that would run code on load is rejected, not executed."""
    config, _ = neox_files
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save({"x": torch.zeros(1), "f": print}, tmp_path / "pytorch_model.bin")  # print would be a global
    assert_one_line_error(tmp_path, r"pytorch_model\.bin: not a readable PyTorch weights file")


def test_no_weights_and_bad_json(tmp_path, neox_files):
    config, _ = neox_files
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(tmp_path, r"no weights \(looked for model\.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    assert_one_line_error(tmp_path, r"config\.json: not valid JSON")


def test_tied_head_in_file_is_ignored(tmp_path):
    """A tied checkpoint that still stores lm_head (some exporters do) loads; the head is the embedding."""
    ref = llama(tied=True)
    folder = saved(ref, tmp_path)
    t = load_file(str(folder / "model.safetensors"))
    save_file({**t, "lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])},
              str(folder / "model.safetensors"))
    model = newllm.load_pretrained(folder, dtype=torch.float32)
    assert model.lm_head.weight is model.embed.weight
    assert_same_logits(model, ref, ids())
