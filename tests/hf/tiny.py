"""Tiny models of every preset for the transformers-integration tests, with weights large enough that
a wrong position, row or buffer moves the logits far past any tolerance."""
from __future__ import annotations

import torch

from newllm import create_model
from newllm.models.presets import PRESETS

V = 97
TINY = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3)
#: per-preset options: segments short enough that the test sequences cross several of them
EXTRA = {"llama": dict(num_key_value_heads=2), "infini": dict(segment_length=8),
         "multi_memory": dict(segment_length=6, num_memories=3), "hierarchical": dict(segment_length=6, num_memories=3),
         "llama_infini": dict(num_key_value_heads=2, segment_length=8), "infini_all": dict(segment_length=8),
         "multi_memory_all": dict(segment_length=6, num_memories=3)}
ALL_PRESETS = sorted(PRESETS)


def randomise(model: torch.nn.Module, seed: int = 0, scale: float = 0.15) -> torch.nn.Module:
    """Every weight ~ N(0, scale^2), norm scales ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else scale * noise)
    return model.eval()


def tiny(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return randomise(create_model(name, **{**TINY, **EXTRA.get(name, {}), **overrides}), seed)


def ids(batch: int = 2, length: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))
