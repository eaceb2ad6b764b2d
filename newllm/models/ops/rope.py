"""Rotary position embeddings (RoPE), rotate-half convention (GPT-NeoX, Llama).

Shapes: B batch, h heads, T tokens, Dh head size, R rotary dims (R <= Dh, even).
"""
from __future__ import annotations

import torch

from newllm.errors import NewLLMError


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


class _SplitRope(torch.autograd.Function):
    """Fused `split_qkv_rope` (see there). Forward and backward each write every element once.

    With x = (x1, x2, x_pass) (halves of the first R dims, then the rest) and c, s the first half of
    cos, sin (RoPE's cos/sin repeat their halves), rotate-half RoPE is
        y1 = x1 c - x2 s,    y2 = x2 c + x1 s,    y_pass = x_pass
    which is bit for bit `x * cos + rotate_half(x) * sin` (negation is exact and a + (-b) == a - b in
    IEEE arithmetic). Its backward is the inverse rotation, again bit for bit what autograd gives:
        g_x1 = g1 c + g2 s,  g_x2 = g2 c - g1 s,    g_pass = g_pass.
    Every product is written into a buffer laid out (..., T, R) like cos/sin: PyTorch's elementwise
    loops order dimensions by the output's strides, and an output laid out (B, T, h, ...) puts the
    broadcast (stride-0) head dims innermost, which runs ~10x slower on CPU.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = qkv.shape
        x = qkv.view(B, T, heads, 3, -1).permute(3, 0, 2, 1, 4)  # (3, B, h, T, Dh) view: q, k, v
        Dh, R = x.shape[-1], cos.shape[-1]
        qk = x.new_empty(2, B, heads, T, Dh)  # rotated q and k, each a contiguous (B, h, T, Dh)
        _rotate(x[:2, ..., :R], cos, sin, qk[..., :R], sign=1)
        qk[..., R:] = x[:2, ..., R:]
        ctx.save_for_backward(cos, sin)
        ctx.shape = (B, T, heads, Dh)
        return qk[0], qk[1], x[2]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        B, T, heads, Dh = ctx.shape
        R = cos.shape[-1]
        dx = cos.new_empty(B, T, heads, 3, Dh)
        view = dx.permute(3, 0, 2, 1, 4)  # (3, B, h, T, Dh) view of the (B, T, 3*d) gradient
        for i, g in enumerate((dq, dk, dv)):
            if g is None:
                view[i].zero_()
            elif i == 2:
                view[i].copy_(g)
            else:
                rot = cos.new_empty(B, heads, T, R)
                _rotate(g[..., :R], cos, sin, rot, sign=-1)  # the inverse rotation
                view[i, ..., :R] = rot
                view[i, ..., R:] = g[..., R:]
        return dx.view(B, T, -1), None, None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, sign: int) -> None:
    """out = (x1 c - sign x2 s, x2 c + sign x1 s) for x, out (..., T, R), cos/sin (T, R)."""
    half = cos.shape[-1] // 2
    x1, x2, s = x[..., :half], x[..., half:], sin[:, :half]
    torch.mul(x, cos, out=out)  # (x1 c, x2 c)
    tmp = torch.empty_like(out[..., :half], memory_format=torch.contiguous_format)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x2, s, out=tmp)
    o1.sub_(tmp, alpha=sign)  # alpha = +-1 is exact: a - (-1) b == a + b
    torch.mul(x1, s, out=tmp)
    o2.add_(tmp, alpha=sign)


def split_qkv_rope(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor):
    """q, k, v (B, h, T, Dh) from a fused projection qkv (B, T, 3 * h * Dh) interleaved per head
    (GPT-NeoX: q, k, v of head 0, then of head 1, ...), with RoPE (cos, sin: (T, R)) on the first R
    dims of q and k.

    Equal, to the bit, to `view(B, T, h, 3 * Dh).transpose(1, 2).split(Dh)` followed by `apply_rope`
    on q and k, forward and backward; one fused autograd node instead of ~20 small ones and their
    copies (the split, cat and transpose that autograd would otherwise materialise for the gradient).
    """
    if cos.shape[-1] % 2:
        raise NewLLMError(f"split_qkv_rope: rotary dims must be even, got {cos.shape[-1]}")
    return _SplitRope.apply(qkv, heads, cos, sin)
