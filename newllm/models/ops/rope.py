"""Rotary position embeddings (RoPE), rotate-half convention (GPT-NeoX, Llama).

Shapes: B batch, h heads, T tokens, Dh head size, R rotary dims (R <= Dh, even).
"""
from __future__ import annotations

import torch


def rope_inv_freq(rotary_dims: int, base: float, device=None) -> torch.Tensor:
    """inv_freq[i] = base^(-2i/R), computed as `transformers` does (int64 arange -> float)."""
    exponent = torch.arange(0, rotary_dims, 2, dtype=torch.int64, device=device).float() / rotary_dims
    return 1.0 / (base**exponent)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (T, R) for integer `positions` (T,), computed in fp32 then cast."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # (T, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, R)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R = cos.shape[-1] dims of x (B, h, T, Dh); the rest pass through."""
    r = cos.shape[-1]
    if r == 0:
        return x
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
