"""GGUF loading on tiny files written here with `gguf.GGUFWriter`: logits equal a tiny random
`transformers` Llama (float32 file) and `transformers`' own GGUF loading (quantized file); the
embedded tokenizer equals `transformers`' GGUF conversion; bad files give one-line errors that
name the file. The real SmolLM2 checks are in test_gguf_smollm.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFWriter
from gguf.quants import quantize as gguf_quantize
from tokenizers import pre_tokenizers

from newllm import NewLLMError, load_pretrained, load_tokenizer
from newllm.checkpoints.gguf import load_gguf_model
from newllm.checkpoints.gguf_tokenizer import tokenizer_from_gguf


# ---------------------------------------------------------------- a tiny byte-level BPE vocabulary
MERGES = ["t h", "th e", "Ġ the", "i n", "in g", "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ", "1 2", "12 3", "Ġ 1", "' s", "Ã ©",
          "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "e r", "Ġ er", "Ġ x"]
SPECIAL = ["<|endoftext|>", "<|im_start|>"]


def tiny_vocab() -> list[str]:
    tokens = list(SPECIAL) + sorted(pre_tokenizers.ByteLevel.alphabet())
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    tokens[tokens.index("Ġx")] = " x"  # some files spell a token with a real space: it must still be found
    return tokens


TOKENS = tiny_vocab()
TINY = dict(hidden=32, heads=4, kv_heads=2, ff=64, layers=2, ctx=128, theta=50000.0, eps=1e-6)


def hf_tiny(tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(TOKENS), hidden_size=TINY["hidden"], intermediate_size=TINY["ff"],
                      num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
                      num_key_value_heads=TINY["kv_heads"], max_position_embeddings=TINY["ctx"],
                      rope_theta=TINY["theta"], rms_norm_eps=TINY["eps"], tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them random so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def to_llamacpp_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation: per head, rows (half, i) -> (i, half) (interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf) -> dict[str, np.ndarray]:
    """The GGUF tensor dict (llama.cpp names and Q/K layout) of a transformers Llama."""
    sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not hf.config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(hf.config.num_hidden_layers):
        for ours, theirs in names.items():
            w = sd[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                w = to_llamacpp_qk(w, TINY["heads"])
            elif theirs == "attn_k":
                w = to_llamacpp_qk(w, TINY["kv_heads"])
            out[f"blk.{i}.{theirs}.weight"] = w
    return out


def write_gguf(path, tensors: dict[str, np.ndarray], arch: str = "llama", qtypes: dict[str, Q] | None = None,
               raw: dict[str, tuple[np.ndarray, Q]] | None = None, pre: str = "gpt2", tok_model: str = "gpt2",
               skip_meta: tuple[str, ...] = (), ff: int | None = None):
    w = GGUFWriter(str(path), arch)
    meta = {
        "block_count": lambda: w.add_block_count(TINY["layers"]),
        "context_length": lambda: w.add_context_length(TINY["ctx"]),
        "embedding_length": lambda: w.add_embedding_length(TINY["hidden"]),
        "feed_forward_length": lambda: w.add_feed_forward_length(ff or TINY["ff"]),
        "head_count": lambda: w.add_head_count(TINY["heads"]),
        "head_count_kv": lambda: w.add_head_count_kv(TINY["kv_heads"]),
        "rope_freq_base": lambda: w.add_rope_freq_base(TINY["theta"]),
        "layer_norm_rms_eps": lambda: w.add_layer_norm_rms_eps(TINY["eps"]),
    }
    for key, add in meta.items():
        if key not in skip_meta:
            add()
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types([3 if t in SPECIAL else 1 for t in TOKENS])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    for name, arr in tensors.items():
        qtype = (qtypes or {}).get(name)
        if qtype is None:
            w.add_tensor(name, arr.astype(np.float32))
        else:
            w.add_tensor(name, gguf_quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    for name, (data, qtype) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


IDS = torch.tensor([[5, 77, 200, 13, 9, 250, 31, 2, 140, 66, 66, 101, 3, 270, 8, 44, 190, 120, 7]])


# ---------------------------------------------------------------- model parity
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_float32_file_matches_transformers_llama(tmp_path, tie):
    hf = hf_tiny(tie)
    path = write_gguf(tmp_path / "tiny.gguf", gguf_tensors(hf))
    model = load_gguf_model(path).eval()
    c, layer = model.config, model.config.layers[0]
    assert (c.vocab_size, c.num_hidden_layers, c.max_position_embeddings, c.tie_word_embeddings) == (len(TOKENS), 2, 128, tie)
    assert (layer["num_attention_heads"], layer["num_key_value_heads"], layer["head_dim"]) == (4, 2, 8)
    assert layer["rope_theta"] == 50000.0 and layer["rms_norm_eps"] == pytest.approx(1e-6, rel=1e-6)
    assert (c.bos_token_id, c.eos_token_id) == (1, 0)
    assert (model.lm_head.weight is model.embed.weight) == tie
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=0)


def test_without_unpermuting_qk_the_logits_differ(tmp_path, monkeypatch):
    """Guards the test above: the Q/K permutation is visible in the logits."""
    hf = hf_tiny(True)
    path = write_gguf(tmp_path / "tiny.gguf", gguf_tensors(hf))
    monkeypatch.setattr("newllm.checkpoints.gguf.unpermute_qk", lambda w, n: w)
    with torch.no_grad():
        assert (load_gguf_model(path)(IDS).logits - hf(IDS).logits).abs().max() > 1e-3


def test_quantized_file_matches_transformers_gguf_loading(tmp_path):
    from transformers import AutoModelForCausalLM

    tensors = gguf_tensors(hf_tiny(False, seed=1))
    kinds = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16]
    qtypes = {name: kinds[i % len(kinds)] for i, name in enumerate(n for n in tensors if tensors[n].ndim == 2)}
    path = write_gguf(tmp_path / "tinyq.gguf", tensors, qtypes=qtypes)
    ours = load_gguf_model(path).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tinyq.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(IDS).logits, ref(IDS).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - load_gguf_model(write_gguf(tmp_path / "f32.gguf", tensors))(IDS).logits).abs().max() > 1e-4  # really quantized


def test_dtype_and_dispatcher(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", gguf_tensors(hf_tiny(True)))
    model = load_pretrained(path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16 and model.config.dtype == "bfloat16"


# ---------------------------------------------------------------- errors
def error_cases(tmp_path):
    t = gguf_tensors(hf_tiny(True))
    good = write_gguf(tmp_path / "good.gguf", t)
    data = good.read_bytes()
    cases = {}
    for label, n in (("0", 0), ("3", 3), ("30", 30), ("third", len(data) // 3), ("tail", len(data) - 2000)):
        p = tmp_path / f"truncated-{label}.gguf"
        p.write_bytes(data[:n])
        cases[f"truncated-{label}"] = (p, "GGUF")
    (tmp_path / "text.gguf").write_text("this is not a model\n")
    cases["not-gguf"] = (tmp_path / "text.gguf", "not a GGUF file")
    iq4 = np.random.default_rng(0).integers(0, 255, size=(TINY["ff"], 18), dtype=np.uint8)
    cases["unsupported-type"] = (write_gguf(tmp_path / "iq4.gguf", {k: v for k, v in t.items() if k != "blk.0.ffn_up.weight"},
                                            raw={"blk.0.ffn_up.weight": (iq4, Q.IQ4_NL)}), "blk.0.ffn_up.weight has type IQ4_NL")
    cases["missing-tensor"] = (write_gguf(tmp_path / "missing.gguf", {k: v for k, v in t.items() if k != "blk.1.ffn_down.weight"}),
                               "missing tensor(s) ['blk.1.ffn_down.weight']")
    cases["extra-tensor"] = (write_gguf(tmp_path / "extra.gguf", {**t, "rope_freqs.weight": np.ones(4, np.float32)}),
                             "unexpected tensor rope_freqs.weight")
    cases["wrong-shape"] = (write_gguf(tmp_path / "shape.gguf", t, ff=96), "blk.0.ffn_gate.weight has shape (64, 32)")
    cases["wrong-architecture"] = (write_gguf(tmp_path / "arch.gguf", t, arch="mamba"), "architecture 'mamba' is not supported")
    cases["missing-metadata"] = (write_gguf(tmp_path / "meta.gguf", t, skip_meta=("head_count",)), "llama.attention.head_count")
    return cases


CASES = ["truncated-0", "truncated-3", "truncated-30", "truncated-third", "truncated-tail", "not-gguf",
         "unsupported-type", "missing-tensor", "extra-tensor", "wrong-shape", "wrong-architecture", "missing-metadata"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    cases = error_cases(tmp_path_factory.mktemp("bad"))
    assert sorted(cases) == sorted(CASES)
    return cases


@pytest.mark.parametrize("case", CASES)
def test_bad_file_gives_one_line_error_naming_the_file(bad_files, case):
    path, expected = bad_files[case]
    with pytest.raises(NewLLMError) as err:
        load_gguf_model(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert expected in msg, msg


def test_cli_prints_the_error_as_one_line(bad_files, capsys):
    from newllm.cli import main

    path, _ = bad_files["truncated-third"]
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("newllm: error: ") and str(path) in err and "\n" not in err


# ---------------------------------------------------------------- tokenizer
TEXTS = ["the thing is 123 and 1234, 12", "  two  spaces   and three\n\n\nnewlines\n", "it's the world's café",
         "wörld 日本語 🎉 é", "<|im_start|>the<|endoftext|>", "\ttabs\r\nand CRLF", "x=3.14159; y = 1000000", "x = 1000000 and 1234567", "a x", ""]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    t = gguf_tensors(hf_tiny(True))
    for pre in ("gpt2", "llama-bpe", "qwen2", "smollm"):
        write_gguf(folder / f"{pre}.gguf", t, pre=pre)
    return folder


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_tokenizer_equals_transformers_gguf_conversion(tok_dir, pre):
    from transformers import AutoTokenizer

    ours = tokenizer_from_gguf(tok_dir / f"{pre}.gguf")
    ref = AutoTokenizer.from_pretrained(str(tok_dir), gguf_file=f"{pre}.gguf")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), (pre, text)
        assert ours.decode(ids) == text
    assert ours.encode("<|im_start|>") == [1]  # a CONTROL token stays whole
    assert ours.encode("a x") == [TOKENS.index("a"), TOKENS.index(" x")]
    assert (ours.eos_token_id, ours.bos_token_id, ours.vocab_size) == (0, 1, len(TOKENS))


def test_pre_tokenizers_differ(tok_dir):
    """Guards the comparison above: the three rule sets give three different encodings here."""
    text = "x = 1000000 and 1234567"
    encodings = {pre: tuple(tokenizer_from_gguf(tok_dir / f"{pre}.gguf").encode(text)) for pre in ("gpt2", "llama-bpe", "qwen2")}
    assert len(set(encodings.values())) == 3, encodings


def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp(tok_dir):
    """llama.cpp's "smollm" rules split every digit before BPE, so the merges "1 2", "12 3" never
    apply; the GPT-2 rules keep "123" together."""
    smollm, gpt2 = load_tokenizer(tok_dir / "smollm.gguf"), load_tokenizer(tok_dir / "gpt2.gguf")
    one, two, three = (TOKENS.index(c) for c in "123")
    assert smollm.encode("123") == [one, two, three]
    assert gpt2.encode("123") == [TOKENS.index("123")]
    assert smollm.encode("the world") == gpt2.encode("the world") == [TOKENS.index("the"), TOKENS.index("Ġworld")]


@pytest.mark.parametrize("what,kwargs,expected", [
    ("model", dict(tok_model="llama"), "tokenizer model 'llama' is not supported"),
    ("pre", dict(pre="mystery-bpe"), "pre-tokenizer 'mystery-bpe' is not supported"),
])
def test_tokenizer_errors_name_the_file(tmp_path, what, kwargs, expected):
    path = write_gguf(tmp_path / f"{what}.gguf", {"token_embd.weight": np.zeros((len(TOKENS), 32), np.float32)}, **kwargs)
    with pytest.raises(NewLLMError, match=expected) as err:
        tokenizer_from_gguf(path)
    assert str(path) in str(err.value)
