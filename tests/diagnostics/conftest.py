"""Tiny models for the diagnostics tests: a random Llama in transformers (a Hugging Face folder),
the same weights as a float32 GGUF with llama.cpp's Q/K layout and a tokenizer, and one whose
ffn_down weights are Q4_K blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.checkpoints.test_gguf import TOKENS, gguf_tensors, write_gguf
from tests.checkpoints.test_hf import llama, randomise, saved

#: "gpt-2", the pre-tokenizer name llama.cpp knows (it rejects the alias "gpt2" that newllm also accepts)
PRE = "gpt-2"
IDS = [5, 77, 200, 13, 9, 250, 31, 2, 140, 66, 66, 101, 3, 270, 8, 44, 190, 120, 7]


def hf_llama(intermediate: int = 64, seed: int = 0):
    """A transformers Llama with test_gguf's shape (hidden 32, 4 heads, 2 kv heads, 2 layers) and
    its vocabulary, every weight random (norm scales ~1 +- 0.1) so that each fault shows."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=intermediate,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, rope_theta=50000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=0, dtype="float32")
    torch.manual_seed(seed)
    return randomise(transformers.LlamaForCausalLM(cfg), seed)


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    return saved(hf_llama(), tmp_path_factory.mktemp("hf_llama"))


@pytest.fixture(scope="session")
def f32_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", gguf_tensors(hf_llama()), pre=PRE)


def q4k_blocks(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but well-formed Q4_K super-blocks for a (rows, cols) weight: d, dmin fp16 ~3e-3, every
    6-bit scale and min and every nibble random. (gguf has no Q4_K quantiser.)"""
    rng = np.random.default_rng(seed)
    n = rows * cols // 256
    b = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
    b[:, 0:2] = np.full(n, 3e-3, np.float16).view(np.uint8).reshape(n, 2)
    b[:, 2:4] = np.full(n, 2e-3, np.float16).view(np.uint8).reshape(n, 2)
    return b.reshape(rows, cols // 256 * 144)


@pytest.fixture(scope="session")
def q4k_gguf(tmp_path_factory):
    """intermediate 256, so ffn_down rows are whole Q4_K super-blocks; both layers' ffn_down are Q4_K."""
    t = gguf_tensors(hf_llama(intermediate=256))
    raw = {f"blk.{i}.ffn_down.weight": (q4k_blocks(32, 256, seed=i), Q.Q4_K) for i in range(2)}
    return write_gguf(tmp_path_factory.mktemp("q4k") / "tiny_q4k.gguf",
                      {k: v for k, v in t.items() if k not in raw}, raw=raw, ff=256, pre=PRE)
