"""Several compressive memories read as an attention-weighted mixture (MultiMemory / Hierarchical layers).

Shapes: B batch, M memories, H memory heads, T tokens, S segment length, Dk / Dv key / value dims.
Built from the blocks of `ops/memory.py` (phi, read_terms, segment_update, guard_update); the
feature map, guards and fp32 arithmetic are the same as `memory_scan`'s.

Write rule (round-robin, deterministic): segment number n, counted over the whole stream
(`state.segments`), is written into memory n % M, with the linear rule or the delta rule against
that memory alone; z_m accumulates sum_t phi(k_t) and a key sum K_m accumulates sum_t k_t (raw
keys) of the segments memory m received. Memory m has received c_m = ceil((n - m) / M) segments
after n segments (0 when n <= m), so its mean key is kbar_m = K_m / (c_m * S).

Read, for a query q of segment s (every memory as it was after segment s-1, as in memory_scan)::

    r_m   = phi(q) M_m / (phi(q) z_m + eps)                     each memory's Infini read-out
    w_m   = softmax_m( rho_h * q . kbar_m / sqrt(Dk) )          over the memories written so far
    A_mem = sum_m w_m r_m                                       (0 while no memory has been written)

Why the mean raw key as each memory's summary: it is the centre of the keys the memory stored,
so q . kbar_m / sqrt(Dk) is the attention logit a query would give an "average" stored token (the
same scale as softmax attention), and it can be negative, unlike phi(q) z_m, whose positive
features make every memory look alike. rho_h (> 0, learned per memory head) sharpens or flattens
the choice; at rho = 0 the read is the plain average of the memories. Empty memories are masked
out so that an unwritten memory never dilutes the read.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from newllm.errors import NewLLMError
from newllm.models.ops.memory import check_shapes, guard_update, phi, read_terms, segment_update


class MixtureState(NamedTuple):
    """M memories of a batch. Batch on dim 0; counters are 0-dim int64 tensors."""

    memory: torch.Tensor  # (B, M, H, Dk, Dv) fp32: M_m
    norm: torch.Tensor  # (B, M, H, Dk) fp32: z_m = sum phi(k)
    key_sum: torch.Tensor  # (B, M, H, Dk) fp32: K_m = sum k (raw keys), for the mean key
    segments: torch.Tensor  # () int64: segments written so far (decides the memory written next)
    skipped: torch.Tensor  # () int64: segment updates skipped for NaN/Inf (one per batch row)


def init_mixture(batch: int, memories: int, heads: int, key_dim: int, value_dim: int,
                 device: torch.device | str | None = None) -> MixtureState:
    long0 = torch.zeros((), dtype=torch.long, device=device)
    return MixtureState(torch.zeros(batch, memories, heads, key_dim, value_dim, device=device),
                        torch.zeros(batch, memories, heads, key_dim, device=device),
                        torch.zeros(batch, memories, heads, key_dim, device=device), long0, long0.clone())


def segments_per_memory(segments: int, memories: int) -> list[int]:
    """c_m: segments memory m has received after `segments` round-robin writes."""
    return [max(0, -(-(segments - m) // memories)) for m in range(memories)]


def mixture_read(q: torch.Tensor, fq: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
                 key_sum: torch.Tensor, counts: list[int], segment_length: int,
                 route_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """A_mem of one segment's queries (see the module docstring).

    q: (B, H, t, Dk) raw queries (fp32), fq: their features; memory: (B, M, H, Dk, Dv); norm,
    key_sum: (B, M, H, Dk); counts[m]: segments in memory m; route_scale: (H,) rho.
    Returns (B, H, t, Dv) fp32.
    """
    B, H, t, Dk = q.shape
    if not any(counts):  # nothing written yet: an empty memory reads 0
        return q.new_zeros(B, H, t, memory.shape[-1])
    num, den = read_terms(fq.unsqueeze(1), memory, norm)  # (B, M, H, t, Dv), (B, M, H, t, 1)
    reads = num / (den + eps)
    n_tok = torch.tensor([max(c, 1) * segment_length for c in counts], dtype=torch.float32, device=q.device)
    kbar = key_sum / n_tok.view(1, -1, 1, 1)  # (B, M, H, Dk): each memory's mean key
    logits = torch.einsum("bhtk,bmhk->bmht", q, kbar) * (Dk**-0.5) * route_scale.float().view(1, 1, H, 1)
    if not all(counts):  # unwritten memories take no part in the mix
        empty = torch.tensor([c == 0 for c in counts], device=q.device).view(1, -1, 1, 1)
        logits = logits.masked_fill(empty, float("-inf"))
    w = logits.softmax(dim=1)  # (B, M, H, t): weights over the memories
    return (w.unsqueeze(-1) * reads).sum(1)


def mixture_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: MixtureState | None = None, *,
                 segment_length: int, route_scale: torch.Tensor, delta_rule: bool = True,
                 scale: float | None = None, eps: float = 1e-6, clamp: float | None = None,
                 check_finite: bool = True, write_partial: bool = True):
    """Read and write M memories over a sequence, segment by segment (see the module docstring).

    q: (B, H, Tq, Dk), the LAST Tq positions of k: (B, H, T, Dk), v: (B, H, T, Dv); k/v start on a
    segment boundary. Returns (A_mem (B, H, Tq, Dv) in q.dtype, new MixtureState). Gradients flow
    into q, k, v, route_scale and the initial state.
    """
    check_shapes("mixture_scan", q, k, v)
    B, H, T, Dk = k.shape
    Dv, Tq, S = v.shape[-1], q.shape[2], segment_length
    if S <= 0:
        raise NewLLMError(f"mixture_scan: segment_length must be > 0, got {S}")
    if state is None:
        raise NewLLMError("mixture_scan: pass an initial state (init_mixture) to fix the number of memories")
    M = state.memory.shape[1]
    if state.memory.shape[2:] != (H, Dk, Dv) or state.memory.shape[0] not in (1, B):
        raise NewLLMError(f"mixture_scan: memory state {tuple(state.memory.shape)} does not fit "
                          f"(B={B}, M, H={H}, Dk={Dk}, Dv={Dv})")
    if route_scale.shape != (H,):
        raise NewLLMError(f"mixture_scan: route_scale must have shape ({H},), got {tuple(route_scale.shape)}")
    scale = Dk**-0.5 if scale is None else scale
    # one tensor per memory, replaced on write (as memory_scan does with banks)
    mems = list(state.memory.float().expand(B, *state.memory.shape[1:]).unbind(1))
    zs = list(state.norm.float().expand(B, *state.norm.shape[1:]).unbind(1))
    ks = list(state.key_sum.float().expand(B, *state.key_sum.shape[1:]).unbind(1))
    first = int(state.segments)
    q_off = T - Tq
    bounds = list(range(0, T, S)) + [T]
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    k32 = k.float()
    fk_segs, k_segs, v_segs = phi(k, scale).split(sizes, dim=2), k32.split(sizes, dim=2), v.split(sizes, dim=2)
    q_sizes = [max(0, b - max(a, q_off)) for a, b in zip(bounds[:-1], bounds[1:])]
    q32 = q.float()
    fq_segs, q_segs = phi(q, scale).split(q_sizes, dim=2), q32.split(q_sizes, dim=2)
    outs, bad_rows, written = [], torch.zeros(B, dtype=torch.long, device=k.device), 0
    # the stacked (B, M, ...) tensors, rebuilt only after a write: a call that writes nothing (most
    # decoding steps) reads and returns the state's own tensors without copying them
    stacked = tuple(t.float().expand(B, *t.shape[1:]) for t in (state.memory, state.norm, state.key_sum))
    for i in range(len(sizes)):
        if q_sizes[i]:
            if stacked is None:
                stacked = (torch.stack(mems, 1), torch.stack(zs, 1), torch.stack(ks, 1))
            counts = segments_per_memory(first + written, M)
            outs.append(mixture_read(q_segs[i], fq_segs[i], *stacked, counts, S, route_scale, eps))
        if sizes[i] < S and not write_partial:
            break
        m = (first + written) % M
        dm, dz = segment_update(fk_segs[i], v_segs[i], mems[m], zs[m], delta_rule, eps)
        dm, dz, bad = guard_update(dm, dz, clamp, check_finite)
        dk = torch.where(bad.view(-1, 1, 1), torch.zeros((), device=k.device), k_segs[i].sum(-2))
        mems[m], zs[m], ks[m] = mems[m] + dm, zs[m] + dz, ks[m] + dk
        bad_rows = bad_rows + bad
        written += 1
        stacked = None
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(B, H, 0, Dv, dtype=torch.float32)
    skipped = int(bad_rows.sum()) if check_finite else 0
    if skipped:
        warnings.warn(f"mixture_scan: non-finite memory update in batch rows "
                      f"{bad_rows.nonzero().flatten().tolist()} skipped ({skipped} segment updates)")
    if stacked is None:
        stacked = (torch.stack(mems, 1), torch.stack(zs, 1), torch.stack(ks, 1))
    new_state = MixtureState(*stacked, state.segments + written, state.skipped + skipped)
    return out.to(q.dtype), new_state
