"""Naive per-token reference loops for the chunkwise ops. Used by tests and benchmarks only.

They restate the equations of `memory.py` and `linear_attention.py` one token at a time, with no
batching across tokens, so a bug in the chunkwise bookkeeping (segment boundaries, offsets,
banks, partial segments) cannot hide in both.
"""
from __future__ import annotations

import torch

from newllm.models.ops.linear_attention import LinearAttentionState
from newllm.models.ops.memory import MemoryState, elu_plus_one, init_memory


def naive_memory_scan(q, k, v, state: MemoryState | None = None, *, segment_length: int, segments_per_bank: int = 1,
                      delta_rule: bool = True, scale: float | None = None, eps: float = 1e-6,
                      clamp: float | None = None, write_partial: bool = True):
    """Per-token loop equal to `memory_scan` (no NaN/Inf guard: that is tested separately)."""
    B, H, T, Dk = k.shape
    Dv, q_off = v.shape[-1], T - q.shape[2]
    scale = Dk**-0.5 if scale is None else scale
    if state is None:
        state = init_memory(B, H, Dk, Dv)
    banks = [state.memory[:, n].expand(B, H, Dk, Dv) for n in range(state.memory.shape[1])]
    norms = [state.norm[:, n].expand(B, H, Dk) for n in range(state.norm.shape[1])]
    segment = int(state.segments)
    outs = []
    dm = torch.zeros(B, H, Dk, Dv)
    dz = torch.zeros(B, H, Dk)
    for t in range(T):
        pos = t % segment_length
        bank = (segment // segments_per_bank) % len(banks)
        if t >= q_off:
            fq = elu_plus_one(q[:, :, t - q_off].float() * scale)  # (B, H, Dk)
            num = sum(torch.einsum("bhk,bhkv->bhv", fq, m) for m in banks)
            den = sum(torch.einsum("bhk,bhk->bh", fq, z) for z in norms)
            outs.append(num / (den[..., None] + eps))
        fk = elu_plus_one(k[:, :, t].float() * scale)
        target = v[:, :, t].float()
        if delta_rule:
            retrieved = torch.einsum("bhk,bhkv->bhv", fk, banks[bank])
            target = target - retrieved / (torch.einsum("bhk,bhk->bh", fk, norms[bank])[..., None] + eps)
        dm = dm + torch.einsum("bhk,bhv->bhkv", fk, target)
        dz = dz + fk
        last = pos == segment_length - 1 or (t == T - 1 and write_partial)
        if last:
            if clamp is not None:
                dm = dm.clamp(-clamp, clamp)
            banks[bank] = banks[bank] + dm
            norms[bank] = norms[bank] + dz
            dm, dz = torch.zeros(B, H, Dk, Dv), torch.zeros(B, H, Dk)
            segment += 1
    out = torch.stack(outs, dim=2) if outs else torch.zeros(B, H, 0, Dv)
    new = MemoryState(torch.stack(banks, 1), torch.stack(norms, 1), torch.tensor(segment), state.skipped.clone())
    return out.to(q.dtype), new


def naive_causal_linear_attention(q, k, v, state: LinearAttentionState | None = None, *, scale: float | None = None,
                                  eps: float = 1e-6, normalize: bool = True):
    """Per-token recurrence equal to `causal_linear_attention`."""
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    kv = torch.zeros(B, H, Dk, Dv) if state is None else state.kv.expand(B, H, Dk, Dv)
    z = torch.zeros(B, H, Dk) if state is None else state.norm.expand(B, H, Dk)
    outs = []
    for t in range(T):
        fq = elu_plus_one(q[:, :, t].float() * scale)
        fk = elu_plus_one(k[:, :, t].float() * scale)
        kv = kv + torch.einsum("bhk,bhv->bhkv", fk, v[:, :, t].float())
        z = z + fk
        num = torch.einsum("bhk,bhkv->bhv", fq, kv)
        if normalize:
            num = num / (torch.einsum("bhk,bhk->bh", fq, z)[..., None] + eps)
        outs.append(num)
    return torch.stack(outs, dim=2).to(q.dtype), LinearAttentionState(kv, z)
