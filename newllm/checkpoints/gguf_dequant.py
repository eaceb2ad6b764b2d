"""Dequantization of GGML tensor types, vectorised in torch (no per-block Python loops).

A quantized GGUF tensor is a run of fixed-size blocks; block type `t` packs `block_size` weights
into `type_size` bytes (`gguf.GGML_QUANT_SIZES`). Each function below takes the raw bytes as
`(n_blocks, type_size)` uint8 and returns `(n_blocks, block_size)` float32. The layouts follow
ggml's `block_*` structs (ggml-common.h); all scales are little-endian fp16 unless noted.

Results equal `gguf.quants.dequantize` bit for bit, because each weight is computed with the same
fp32 operations in the same order as ggml's reference `dequantize_row_*` (one product for
`d * q`, then one subtraction or addition for a min; torch never fuses them into an FMA here).

Legacy types (32 weights a block):
    Q4_0  d | 16 B nibbles           w = d * (q - 8)             q in 0..15
    Q4_1  d, m | 16 B nibbles        w = d * q + m
    Q5_0  d | qh (u32) | nibbles     w = d * (q - 16)            q = nibble | bit_j(qh) << 4
    Q5_1  d, m | qh | nibbles        w = d * q + m
    Q8_0  d | 32 x int8              w = d * q
  Nibble order: weight j < 16 is the low nibble of byte j, weight j >= 16 the high nibble of j-16.

K-quants (256 weights a "super-block", sub-blocks of 16 or 32 weights with their own scales):
    Q2_K  16 B scales (lo 4: scale, hi 4: min) | 64 B 2-bit q | d | dmin
          w = (d * sc) * q - (dmin * mn), sub-blocks of 16
    Q3_K  32 B high-bit mask | 64 B 2-bit q | 12 B 6-bit scales | d
          w = (d * (sc - 32)) * (q - (hbit ? 0 : 4)), sub-blocks of 16
    Q4_K  d | dmin | 12 B 6-bit scales+mins | 128 B nibbles
          w = (d * sc) * q - (dmin * mn), sub-blocks of 32
    Q5_K  d | dmin | 12 B scales+mins | 32 B high bits | 128 B nibbles     (as Q4_K, q has 5 bits)
    Q6_K  128 B low nibbles | 64 B 2-bit highs | 16 x int8 scales | d
          w = (d * sc) * (q - 32), sub-blocks of 16
  In the 2-bit layouts, byte l of a 32-byte group holds weights l, l+32, l+64, l+96 (bit pairs
  0-1, 2-3, 4-5, 6-7); in the nibble layouts, byte l of a 32-byte group holds weight l (low
  nibble) of one sub-block and weight l (high nibble) of the next.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

QK_K = 256  # weights per K-quant super-block (ggml's QK_K)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) uint8 little-endian fp16 -> (N, 1) float32 (exact)."""
    return b.contiguous().view(torch.float16).float()


def _shifts(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, G, 32) bytes -> (N, G, 2, 32): [..., 0, :] low nibbles, [..., 1, :] high nibbles."""
    return (qs.unsqueeze(-2) >> _shifts([0, 4], qs).view(2, 1)) & 0x0F


def _bits(b: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """(..., L) bytes -> (..., count, L): field i is bits [i*width, (i+1)*width) of each byte."""
    shifts = _shifts([i * width for i in range(count)], b).view(count, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _qh32(qh: torch.Tensor) -> torch.Tensor:
    """(N, 4) bytes of a little-endian uint32 -> (N, 32): bit j of the word at index j."""
    return _bits(qh, 8, 1).transpose(-1, -2).reshape(qh.shape[0], 32)


# ------------------------------------------------------------------ float types
def deq_f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def deq_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def deq_bf16(b: torch.Tensor) -> torch.Tensor:
    # bf16 is the top half of an fp32: widen the bits (not the value, so NaN payloads survive)
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# ------------------------------------------------------------------ legacy 32-weight blocks
def deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).reshape(b.shape[0], 32)
    return d * (q.to(torch.int8) - 8).float()


def deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:]).reshape(b.shape[0], 32)
    return d * q.float() + m


def deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:]).reshape(b.shape[0], 32) | (_qh32(b[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).float()


def deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]).reshape(b.shape[0], 32) | (_qh32(b[:, 4:8]) << 4)
    return d * q.float() + m


def deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).float() * d


# ------------------------------------------------------------------ K-quants (256-weight super-blocks)
def deq_q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0x0F).float()).view(n, 16, 1)  # (N, 16 sub-blocks, 1)
    ml = (dmin * (sc >> 4).float()).view(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), 4, 2).reshape(n, 16, 16).float()  # (half, pair, l) -> weight order
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """(N, 12) packed -> (N, 16) signed 6-bit scales: low 4 bits from bytes 0..7 (lo then hi
    nibble), high 2 bits from bytes 8..11 (pairs 0-1 for scales 0..3, 2-3 for 4..7, ...)."""
    n = s.shape[0]
    low = _bits(s[:, :8], 2, 4).reshape(n, 16)
    high = _bits(s[:, 8:12], 4, 2).reshape(n, 16)
    return (low | (high << 4)).to(torch.int8) - 32


def deq_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, d = b[:, :32], b[:, 32:96], _f16(b[:, 108:110])
    dl = (d * _q3_k_scales(b[:, 96:108]).float()).view(n, 16, 1)
    low = _bits(qs.reshape(n, 2, 32), 4, 2).reshape(n, 16, 16)  # weight = half*128 + pair*32 + l
    high = _bits(hmask, 8, 1).reshape(n, 16, 16)  # bit (half*4 + pair) of byte l
    q = low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)  # a set bit means "no -4"
    return (dl * q.float()).reshape(n, QK_K)


def _k4_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 12) -> two (N, 8) 6-bit fields. Sub-blocks 0..3: low 6 bits of bytes 0..3 (scale) and
    4..7 (min); sub-blocks 4..7: nibbles of bytes 8..11 plus the top 2 bits of bytes 0..3 / 4..7."""
    a, m, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)), dim=1)
    mn = torch.cat((m & 0x3F, (c >> 4) | ((m >> 6) << 4)), dim=1)
    return sc, mn


def deq_q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales_mins(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales_mins(b[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    low = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], 8, 1)  # (N, 8, 32): bit j of byte l is the 5th bit of sub-block j
    return (dl * (low | (high << 4)).float() - ml).reshape(n, QK_K)


def deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128].reshape(n, 2, 2, 32), b[:, 128:192].reshape(n, 2, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    dl = (d * sc).view(n, 16, 1)
    # per half: weight s*64 + c*32 + l is nibble s of ql byte c*32 + l, with bits (2f, 2f+1) of
    # qh byte l as its top bits, f = 2s + c
    low = _nibbles(ql).transpose(2, 3).reshape(n, 2, 4, 32)  # (N, half, s*2 + c, l)
    high = _bits(qh, 4, 2)  # (N, half, f, l)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


DEQUANTIZERS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: deq_f32, Q.F16: deq_f16, Q.BF16: deq_bf16,
    Q.Q4_0: deq_q4_0, Q.Q4_1: deq_q4_1, Q.Q5_0: deq_q5_0, Q.Q5_1: deq_q5_1, Q.Q8_0: deq_q8_0,
    Q.Q2_K: deq_q2_k, Q.Q3_K: deq_q3_k, Q.Q4_K: deq_q4_k, Q.Q5_K: deq_q5_k, Q.Q6_K: deq_q6_k,
}
SUPPORTED = tuple(t.name for t in DEQUANTIZERS)


def dequantize(raw: np.ndarray | torch.Tensor, qtype: Q | int) -> torch.Tensor:
    """Raw bytes of a tensor of GGML type `qtype` -> float32 weights, flat (n_blocks * block_size,).

    `raw` holds whole blocks (any shape; a numpy array of any dtype is read as its bytes). Raises
    `KeyError` for a type without a dequantizer and `ValueError` for a partial block; the GGUF
    loader turns both into a `NewLLMError` naming the tensor and file.
    """
    qtype = Q(qtype)
    fn = DEQUANTIZERS[qtype]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.array(raw, copy=True).view(np.uint8).reshape(-1))  # own copy: mmap is read-only
    raw = raw.reshape(-1)
    if raw.dtype != torch.uint8 or raw.numel() % type_size:
        raise ValueError(f"{raw.numel()} bytes is not a whole number of {qtype.name} blocks of {type_size} bytes")
    blocks = raw.view(-1, type_size)
    out = fn(blocks)
    assert out.shape == (blocks.shape[0], block_size) and out.dtype == torch.float32
    return out.reshape(-1)
