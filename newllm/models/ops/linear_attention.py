"""Causal linear attention (Katharopoulos et al. 2020) with a carried state, chunkwise-parallel.

Shapes: B batch, H heads, T tokens, C chunk size, Dk key dim, Dv value dim.
With phi(x) = sigma(x * scale), sigma = elu + 1 (see `memory.py`), token t reads

    S_t = S_0 + sum_{j<=t} phi(k_j)^T v_j           (Dk, Dv)
    z_t = z_0 + sum_{j<=t} phi(k_j)                  (Dk,)
    out_t = phi(q_t) S_t / (phi(q_t) z_t + eps)      normalize=True (a kernel-weighted mean of values)
    out_t = phi(q_t) S_t                             normalize=False

Chunkwise form (as flash-linear-attention's `chunk` ops): the sequence is cut into chunks of C
tokens; inside a chunk the causal part is a masked (C x C) matmul, and the contribution of the
earlier chunks is phi(Q_c) S_{start of c}, where the chunk-start states are an exclusive cumulative
sum of the chunks' phi(K_c)^T V_c. Everything is parallel; the price is one (Dk, Dv) state per
chunk in memory. The last chunk is padded with phi(k) = 0 rows, which add nothing to any state.
All arithmetic is fp32; the output is cast back to q's dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from newllm.errors import NewLLMError
from newllm.models.ops.memory import check_shapes, phi


class LinearAttentionState(NamedTuple):
    kv: torch.Tensor  # (B, H, Dk, Dv) fp32: S = sum phi(k)^T v
    norm: torch.Tensor  # (B, H, Dk) fp32: z = sum phi(k)


def causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            state: LinearAttentionState | None = None, *, scale: float | None = None,
                            eps: float = 1e-6, chunk_size: int = 64, normalize: bool = True):
    """Returns (out (B, H, T, Dv) in q.dtype, LinearAttentionState after the last token).

    q, k: (B, H, T, Dk); v: (B, H, T, Dv); `scale=None` means 1/sqrt(Dk). Gradients flow into
    q, k, v and the initial state.
    """
    check_shapes("causal_linear_attention", q, k, v)
    if q.shape[2] != k.shape[2]:
        raise NewLLMError(f"causal_linear_attention: q has {q.shape[2]} tokens, k has {k.shape[2]}")
    if chunk_size <= 0:
        raise NewLLMError(f"causal_linear_attention: chunk_size must be > 0, got {chunk_size}")
    B, H, T, Dk = k.shape
    Dv, C = v.shape[-1], chunk_size
    scale = Dk**-0.5 if scale is None else scale
    if state is None:
        state = LinearAttentionState(k.new_zeros(1, H, Dk, Dv, dtype=torch.float32),
                                     k.new_zeros(1, H, Dk, dtype=torch.float32))
    n = -(-T // C)
    pad = n * C - T
    fq, fk, vf = phi(q, scale), phi(k, scale), v.float()
    if pad:  # padded keys have phi = 0: they add nothing to S or z
        fq, fk, vf = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, vf))
    fq, fk, vf = (t.view(B, H, n, C, -1) for t in (fq, fk, vf))  # (B, H, n, C, D)
    dkv = fk.transpose(-1, -2) @ vf  # (B, H, n, Dk, Dv): each chunk's contribution
    dz = fk.sum(-2)  # (B, H, n, Dk)
    kv_end = state.kv.unsqueeze(2).float() + dkv.cumsum(2)  # state after each chunk
    z_end = state.norm.unsqueeze(2).float() + dz.cumsum(2)
    kv_start = torch.cat((state.kv.float().expand(B, H, Dk, Dv).unsqueeze(2), kv_end[:, :, :-1]), 2)
    z_start = torch.cat((state.norm.float().expand(B, H, Dk).unsqueeze(2), z_end[:, :, :-1]), 2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (fq @ fk.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, n, C, C)
    num = scores @ vf + fq @ kv_start  # (B, H, n, C, Dv)
    if normalize:
        den = scores.sum(-1, keepdim=True) + fq @ z_start.unsqueeze(-1)
        num = num / (den + eps)
    out = num.reshape(B, H, n * C, Dv)[:, :, :T]
    return out.to(q.dtype), LinearAttentionState(kv_end[:, :, -1], z_end[:, :, -1])
