"""Fixtures for the training tests: real text (tiny-shakespeare's first 20k characters) through a
small BPE trained on it, a tiny Pythia-style model, and a tiny TrainConfig."""
from __future__ import annotations

import numpy as np
import pytest
import torch

TINY_MODEL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)


@pytest.fixture(scope="session")
def shakespeare(shared_dir):
    """(tokenizer, int32 token ids) for the first 20,000 characters of tiny-shakespeare."""
    from newllm.data.bpe import train_bpe

    text = (shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:20000]
    tok = train_bpe([text], 300)
    return tok, np.asarray(tok.encode(text), dtype=np.int32)


@pytest.fixture
def make_model(shakespeare):
    def make(seed=0, preset="pythia", **overrides):
        from newllm import create_model

        torch.manual_seed(seed)
        return create_model(preset, vocab_size=shakespeare[0].vocab_size, **{**TINY_MODEL, **overrides})

    return make


@pytest.fixture
def make_cfg(tmp_path):
    def make(name="run", **fields):
        from newllm.train import TrainConfig

        base = dict(run_dir=str(tmp_path / name), device="cpu", seq_len=16, batch_size=4, grad_accum=2,
                    warmup_steps=2, max_steps=6, lr=3e-3, min_lr=3e-4, log_every=1, checkpoint_every=0,
                    progress=False, eval={"every": 0}, data={"tokenizer": "unused.json"})
        return TrainConfig.from_dict({**base, **fields})

    return make

