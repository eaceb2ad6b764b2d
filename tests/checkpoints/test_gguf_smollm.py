"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF) loaded by newllm against `transformers`' own
GGUF loading: same logits, same tokenizer, greedy "Paris", a sane perplexity on tiny-shakespeare.
Slow (the model loads once per module, twice counting the reference) but run in CI."""
from __future__ import annotations

import math

import pytest
import torch

from newllm import load_pretrained, load_tokenizer

pytestmark = pytest.mark.slow
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def path(shared_dir):
    return shared_dir / "models" / NAME


@pytest.fixture(scope="module")
def model(path):
    return load_pretrained(path).eval()


@pytest.fixture(scope="module")
def tok(path):
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def shakespeare(shared_dir):
    return (shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()


@pytest.fixture(scope="module")
def hf_tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=NAME)


def test_config_from_metadata(model):
    c, layer = model.config, model.config.layers[0]
    assert (c.vocab_size, c.num_hidden_layers, c.hidden_size, c.tie_word_embeddings) == (49152, 30, 576, True)
    assert (layer["num_attention_heads"], layer["num_key_value_heads"], layer["intermediate_size"]) == (9, 3, 1536)
    assert layer["rope_theta"] == 100000.0 and (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert model.lm_head.weight is model.embed.weight


def test_tokenizer_equals_transformers(tok, hf_tok, shakespeare):
    text = shakespeare[:20000]
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    for s in ["  leading and   inner spaces ", "digits 2024, 3.14159 and 1000000", "naïve café — 日本語 🎉",
              "line\nbreaks\n\n\nand\r\nCRLF\ttab", "<|im_start|>user\nHi!<|im_end|>", "it's we'll THEY'D"]:
        assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False), s
    assert tok.encode("<|im_start|>") == [1] and tok.eos_token_id == 2


def test_logits_match_transformers(path, model, tok, shakespeare):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=NAME, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(shakespeare[:2000])[:128]])
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"\nSmolLM2-135M Q4_1, 128 tokens: max |logit diff| vs transformers = {diff:.2e}")
    assert diff <= 1e-3


def test_greedy_paris(model, tok):
    prompt = torch.tensor([tok.encode("The capital of France is")])
    out = model.generate(prompt, max_new_tokens=3)
    assert tok.decode(out[0, prompt.shape[1]:].tolist()).startswith(" Paris")


def test_perplexity_on_tiny_shakespeare(model, tok, shakespeare):
    """Token perplexity of the first 4,096 tokens, as 2 windows of 2,048 (each scored from its start)."""
    ids = torch.tensor([tok.encode(shakespeare[:30000])[:4096]])
    assert ids.shape[1] == 4096
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in ids.split(2048, dim=1):
            logits = model(window).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    ppl = math.exp(nll / count)
    print(f"\nSmolLM2-135M Q4_1 token perplexity, tiny-shakespeare first 4096 tokens (2 x 2048): {ppl:.2f}")
    assert 20 < ppl < 80
