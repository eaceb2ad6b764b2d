"""Shared fixtures: where the real data lives, tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWLLM_DATA_DIR", ROOT.parent / "shared"))
SMOLLM_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
NEOX_TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"

# One intra-op thread unless NEWLLM_TEST_THREADS says otherwise: the tests run tiny models, whose
# ops gain nothing from splitting, and on a shared machine two threads make every small op wait for
# a descheduled sibling (measured here: ~8 ms per op, 30x the work itself).
torch.set_num_threads(int(os.environ.get("NEWLLM_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"real data expected at {SHARED} (set NEWLLM_DATA_DIR)"
    return SHARED


@pytest.fixture
def tiny_pythia():
    from newllm import create_model

    torch.manual_seed(0)
    return create_model("pythia", vocab_size=97, hidden_size=32, num_attention_heads=4,
                        intermediate_size=64, num_hidden_layers=2)
