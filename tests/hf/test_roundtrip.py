"""save_pretrained -> AutoModelForCausalLM.from_pretrained: the same model, bit for bit (fp32, torch.equal).

Every preset in newllm.models.presets.PRESETS at tiny sizes; buffers that transformers 5 refills with
torch.empty on load (RoPE inv_freq) must come back computed; config.json is type-checked when read;
a weight file that does not fit is an error, not a random init.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import newllm.hf as nh
from newllm import NewLLMError
from newllm.hf import NewLLMConfig, NewLLMForCausalLM
from tests.hf.tiny import ALL_PRESETS, V, ids, tiny


def saved(model, tmp_path):
    folder = tmp_path / "hf"
    nh.to_hf(model).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_round_trips_bit_equal(name, tmp_path):
    model = tiny(name)
    folder = saved(model, tmp_path)
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files  # no pickle
    assert json.loads((folder / "config.json").read_text())["model_type"] == "newllm"
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is NewLLMForCausalLM and type(loaded.model) is type(model)
    assert loaded.model.config.to_dict() == model.config.to_dict()
    x = ids(2, 13)
    with torch.no_grad():
        ours, theirs = model(x).logits, loaded(x).logits
    assert torch.equal(ours, theirs)
    if model.config.tie_word_embeddings:
        assert loaded.model.lm_head.weight is loaded.model.embed.weight
    # weights in memory of their own, aligned as torch allocates (not views into the mapped file)
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    # every buffer, non-persistent ones included (RoPE inv_freq), is what a fresh build computes
    want = dict(model.named_buffers())
    got = {k.removeprefix("model."): v for k, v in loaded.named_buffers()}
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_rope_buffers_are_recomputed_after_loading(tmp_path):
    """The transformers 5 quirk: on load, non-persistent buffers are refilled with torch.empty."""
    model = tiny("llama")
    loaded = AutoModelForCausalLM.from_pretrained(saved(model, tmp_path))
    inv = {k: v for k, v in loaded.named_buffers() if k.endswith("inv_freq")}
    assert len(inv) == 3  # one per layer
    ref = model.layers[0].self_attn.inv_freq
    assert ref.numel() > 1 and bool((ref > 0).all())
    for v in inv.values():
        assert torch.equal(v, ref)


def test_a_fresh_hf_model_and_to_hf_share_the_newllm_semantics():
    model = tiny("infini")
    hf = nh.to_hf(model)
    assert hf.model is model and hf.get_input_embeddings() is model.embed
    x = ids(1, 11)
    model.reset_memory()
    model(x, update_memory=True)  # a held memory: the HF model must not read it
    with torch.no_grad(), model.memory_aside():
        want = model(x).logits
    assert torch.equal(hf(x).logits, want)
    out = hf(x, labels=x)
    assert torch.allclose(out.loss, model(x, labels=x, state=model.init_state(1)).loss, rtol=0, atol=1e-6)
    fresh = NewLLMForCausalLM(NewLLMConfig.from_model_config(model.config))
    assert fresh.model.config.to_dict() == model.config.to_dict()
    assert torch.equal(fresh.model.layers[1].attention.inv_freq, model.layers[1].attention.inv_freq)


def test_registration_on_import():
    cfg = NewLLMConfig.from_model_config(tiny("pythia").config)
    assert AutoConfig.for_model("newllm").__class__ is NewLLMConfig
    assert type(AutoModelForCausalLM.from_config(cfg)) is NewLLMForCausalLM


def test_config_mirrors_the_standard_fields_and_checks_them(tmp_path):
    model = tiny("llama")
    cfg = NewLLMConfig.from_model_config(model.config)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.tie_word_embeddings) == (V, 32, 3, True)
    assert cfg.max_position_embeddings == model.config.max_position_embeddings
    folder = saved(model, tmp_path)
    assert NewLLMConfig.from_pretrained(folder).model_config == model.config
    raw = json.loads((folder / "config.json").read_text())

    def write(d):
        (folder / "config.json").write_text(json.dumps(d))

    write({**raw, "vocab_size": V + 1})  # a mirror edited by hand: describes another model
    with pytest.raises(NewLLMError, match="vocab_size is 98 but newllm_config says 97"):
        AutoModelForCausalLM.from_pretrained(folder)
    bad = json.loads(json.dumps(raw))
    bad["newllm_config"]["layers"][1]["num_attention_heads"] = "4"
    write(bad)
    with pytest.raises(NewLLMError, match=r"layers\[1\]\.num_attention_heads must be an integer"):
        AutoModelForCausalLM.from_pretrained(folder)
    bad = json.loads(json.dumps(raw))
    del bad["newllm_config"]["norm_eps"]
    write(bad)
    with pytest.raises(NewLLMError, match="norm_eps"):
        AutoModelForCausalLM.from_pretrained(folder)
    bad = json.loads(json.dumps(raw))
    bad["newllm_config"]["layers"][0]["type"] = "no_such_layer"
    write(bad)
    with pytest.raises(NewLLMError, match="no_such_layer"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(NewLLMError, match="describes no model"):
        NewLLMForCausalLM(NewLLMConfig())


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_weights_that_do_not_fit_are_an_error(change, tmp_path):
    folder = saved(tiny("pythia"), tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.dense_h_to_4h.weight"
    assert key in tensors
    if change == "missing":
        del tensors[key]
    elif change == "unexpected":
        tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    else:
        tensors[key] = torch.zeros(3, 3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NewLLMError, match={"missing": f"missing keys \\['{key}'\\]",
                                           "unexpected": "unexpected keys", "shape": "shape does not fit"}[change]):
        AutoModelForCausalLM.from_pretrained(folder)


def test_pickle_is_never_read(tmp_path):
    folder = saved(tiny("pythia"), tmp_path)
    with pytest.raises(NewLLMError, match="use_safetensors=False"):
        NewLLMForCausalLM.from_pretrained(folder, use_safetensors=False)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(folder)


def test_forward_refuses_what_it_cannot_honour():
    hf = nh.to_hf(tiny("pythia"))
    x = ids(2, 5)
    mask = torch.ones_like(x)
    assert torch.equal(hf(x, attention_mask=mask).logits, hf(x).logits)  # all ones: no padding, accepted
    mask[1, 0] = 0
    with pytest.raises(NewLLMError, match=r"attention_mask has padding \(a 0 at batch 1, position 0\)"):
        hf(x, attention_mask=mask)
    for key in ("cache", "past_key_values"):
        with pytest.raises(NewLLMError, match=f"{key}= is not how newllm carries state"):
            hf(x, **{key: object()})
    with pytest.raises(NewLLMError, match="inputs_embeds"):
        hf(inputs_embeds=torch.zeros(1, 2, 32))
    with pytest.raises(NewLLMError, match="state must be"):
        hf(x, state="memory.safetensors")


def test_from_pretrained_with_a_dtype_builds_the_model_in_it(tmp_path):
    model = tiny("llama")
    loaded = AutoModelForCausalLM.from_pretrained(saved(model, tmp_path), dtype=torch.bfloat16)
    assert loaded.model.config.dtype == "bfloat16" and loaded.config.model_config.dtype == "bfloat16"
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.model.layers[2].mlp.up_proj.weight, model.layers[2].mlp.up_proj.weight.bfloat16())
    assert torch.equal(loaded.model.layers[0].self_attn.inv_freq, model.layers[0].self_attn.inv_freq.bfloat16())
    assert loaded(ids(1, 5)).logits.dtype == torch.bfloat16


def test_a_model_level_buffer_is_recomputed_too(tmp_path):
    """ContextLM with init="zero" keeps h_{-1} as a non-persistent buffer of the model itself."""
    model = tiny("context_pythia", context_feedback={"init": "zero"})
    assert "h_init" in model._non_persistent_buffers_set
    loaded = AutoModelForCausalLM.from_pretrained(saved(model, tmp_path))
    assert torch.equal(loaded.model.h_init, torch.zeros(32))
    x = ids(1, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_to_hf_leaves_the_wrapped_models_buffers_alone():
    model = tiny("pythia")
    with torch.no_grad():
        model.layers[0].attention.inv_freq.mul_(0.5)  # a user's own change (e.g. a RoPE experiment)
    changed = model.layers[0].attention.inv_freq.clone()
    nh.to_hf(model)
    assert torch.equal(model.layers[0].attention.inv_freq, changed)
