"""Compressive memory (Infini-attention, arXiv 2404.07143): pure functions, state in -> (output, state).

Shapes: B batch, N memory banks, H memory heads, T tokens, S segment length, Dk key dim, Dv value dim.
Feature map: sigma(x) = elu(x) + 1 (> 0, so every denominator below is >= 0).

Equations, for a segment s with queries Q, keys K, values V (rows are tokens)::

    phi(X)  = sigma(X * scale)                                  feature map, scale = 1/sqrt(Dk) by default
    A_mem   = phi(Q) M_{s-1} / (phi(Q) z_{s-1} + eps)           read              (paper eq. 3)
    linear: M_s = M_{s-1} + phi(K)^T V                           write             (paper eq. 4)
    delta:  M_s = M_{s-1} + phi(K)^T (V - phi(K) M_{s-1} / (phi(K) z_{s-1} + eps))  (paper eq. 5)
            z_s = z_{s-1} + sum_t phi(K_t)

The memory is written once per segment, after the segment has been read: every token of segment
s reads M_{s-1}, never a memory that already contains its own segment (that is what makes the
whole-sequence op equal to the per-token loop in `naive.py`, and what lets a layer carry a
partial segment across calls).

Interface (what the layers build on)::

    state = init_memory(B, H, Dk, Dv, banks=N)                  # MemoryState, all zeros
    out, state = memory_scan(q, k, v, state, segment_length=S, ...)

    q: (B, H, Tq, Dk), k: (B, H, T, Dk), v: (B, H, T, Dv), Tq <= T. k/v start on a segment
    boundary; the queries are the LAST Tq positions of k/v (a layer that carries the first
    T - Tq keys of the current segment passes them in front of the new ones).
    out: (B, H, Tq, Dv) in q's dtype; memory arithmetic is fp32 whatever the input dtype.

`memory_scan` loops over segments (T / S iterations) and is parallel inside a segment (matmuls of
S rows). Any T works: a last, shorter segment is written only if `write_partial=True` (a layer
passes False and keeps those tokens in its state until the segment completes); nothing is ever
padded, so no padded position can write to memory.

Building blocks, for memories with their own read/write policy (multi-memory, hierarchical):
`scan_segments` (the segment bookkeeping: which queries read which memory, which segments are
written; every scan in this package is a store driven by it), `phi`, `read_terms` / `memory_read`
(one memory, any leading dims), `segment_update` (dM, dz of one segment against one memory) and
`guard_update` (clamp + NaN/Inf skip). `BankedMemory` is the store of this file.

Banks (N > 1): segment number n (counted over the whole stream, `state.segments`) is written into
bank (n // segments_per_bank) % N, so writing moves to the next bank once a bank has absorbed its
segments and wraps around (a revisited bank keeps its contents; nothing is ever discarded). The
delta rule corrects against the bank being written. A read pools all banks:
    A_mem = sum_b phi(Q) M_b / (sum_b phi(Q) z_b + eps)
which is the mixture of the per-bank reads weighted by each bank's match phi(Q) z_b with the query
(the weights sum to one). With the linear rule N banks therefore read like one memory; banks matter
with the delta rule, where each bank only corrects its own contents.

Numerical guards (seed 000, DESIGN.md section 5): keys and queries are scaled (1/sqrt(Dk) by
default), never L2-normalised (that destroys their magnitude); an optional elementwise clamp of
each segment's update dM; an update with a NaN/Inf is skipped for that batch row, with a warning,
and counted in `state.skipped`. The memory is kept in fp32: z grows like (tokens x mean phi(k)),
which passes fp16's 65,504 after ~65K tokens.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from newllm.errors import NewLLMError


class MemoryState(NamedTuple):
    """Compressive memory of a batch. Batch on dim 0; counters are 0-dim int64 tensors."""

    memory: torch.Tensor  # (B, N, H, Dk, Dv) fp32: M of each bank
    norm: torch.Tensor  # (B, N, H, Dk) fp32: z of each bank
    segments: torch.Tensor  # () int64: segments written so far (decides the bank written next)
    skipped: torch.Tensor  # () int64: segment updates skipped for NaN/Inf (one per batch row)


def init_memory(batch: int, heads: int, key_dim: int, value_dim: int, banks: int = 1,
                device: torch.device | str | None = None) -> MemoryState:
    """An empty memory: M = 0, z = 0 (so the first read returns 0 through the guarded denominator)."""
    long0 = torch.zeros((), dtype=torch.long, device=device)
    return MemoryState(torch.zeros(batch, banks, heads, key_dim, value_dim, device=device),
                       torch.zeros(batch, banks, heads, key_dim, device=device), long0, long0.clone())


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = elu(x) + 1: positive everywhere, ~x+1 near 0, so phi(q).phi(k) is a valid kernel."""
    return F.elu(x) + 1.0


def phi(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Feature map sigma(x * scale) computed in fp32 (memory arithmetic never runs in fp16/bf16)."""
    return elu_plus_one(x.float() * scale)


def read_terms(fq: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor):
    """Numerator phi(Q) M (..., T, Dv) and denominator phi(Q) z (..., T, 1) of a read.

    fq: (..., T, Dk) features; memory: (..., Dk, Dv); norm: (..., Dk). Returned separately so that
    several memories can be pooled by summing both terms.
    """
    return fq @ memory, fq @ norm.unsqueeze(-1)


def memory_read(fq: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """A_mem = phi(Q) M / (phi(Q) z + eps), (..., T, Dv). An empty memory reads 0."""
    num, den = read_terms(fq, memory, norm)
    return num / (den + eps)


def segment_update(fk: torch.Tensor, v: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
                   delta_rule: bool, eps: float):
    """(dM, dz) that one segment adds to one memory; fk: (..., S, Dk) features, v: (..., S, Dv).

    linear: dM = phi(K)^T V; delta: dM = phi(K)^T (V - phi(K) M / (phi(K) z + eps)), i.e. only what
    the memory does not already predict is written. dz = sum_t phi(K_t). All fp32.
    """
    v = v.float()
    if delta_rule:
        v = v - memory_read(fk, memory, norm, eps)  # eq. 5: retrieve with the memory before the write
    return fk.transpose(-1, -2) @ v, fk.sum(dim=-2)  # eq. 4: sigma(K)^T V (V delta-corrected: eq. 5); dz


def guard_update(dm: torch.Tensor, dz: torch.Tensor, clamp: float | None, check_finite: bool):
    """Clamp dM elementwise to [-clamp, clamp] and zero the update of any batch row holding NaN/Inf.

    dm: (B, ...), dz: (B, ...). Returns (dm, dz, bad) with bad: (B,) bool, the rows skipped.
    """
    if clamp is not None:
        dm = dm.clamp(-clamp, clamp)
    if not check_finite:
        return dm, dz, torch.zeros(dm.shape[0], dtype=torch.bool, device=dm.device)
    ok = torch.isfinite(dm).flatten(1).all(1) & torch.isfinite(dz).flatten(1).all(1)  # (B,)
    dm = torch.where(ok.view(-1, *[1] * (dm.dim() - 1)), dm, torch.zeros((), device=dm.device))
    dz = torch.where(ok.view(-1, *[1] * (dz.dim() - 1)), dz, torch.zeros((), device=dz.device))
    return dm, dz, ~ok


def check_shapes(where: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise NewLLMError(f"{where}: q, k, v must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                          f"{tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise NewLLMError(f"{where}: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] > k.shape[2]:
        raise NewLLMError(f"{where}: {q.shape[2]} queries but only {k.shape[2]} keys")


def scan_segments(where: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, store, *, first: int,
                  segment_length: int, write_partial: bool, check_finite: bool, parts: int = 1):
    """The segment bookkeeping every compressive memory shares (Infini, banks, mixtures, coarse-to-fine).

    k, v: (B, H, T, D) start on a segment boundary; q: (B, H, Tq, Dk) are their LAST Tq positions.
    For each segment s in order: if it holds queries, `store.read(q_s, n)` reads the memory as it was
    after the n = first + (segments written so far) segments before it (M_{s-1}: a segment never reads
    itself) and returns `parts` outputs; then, if the segment is complete (or `write_partial`),
    `store.write(k_s, v_s, n)` writes it and returns the (B,) rows it skipped for NaN/Inf. Nothing
    is ever padded. Segments are views cut once with `split` (its backward is one concatenation;
    slicing inside the loop would make every segment's backward allocate a full-length gradient).

    Returns (the `parts` outputs (B, H, Tq, Dv) in q.dtype, segments written, updates skipped; a
    skipped update is also a warning naming the `where` and the rows).
    """
    B, _, T, _ = k.shape
    S, q_off = segment_length, T - q.shape[2]
    bounds = list(range(0, T, S)) + [T]
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    q_sizes = [max(0, b - max(a, q_off)) for a, b in zip(bounds[:-1], bounds[1:])]  # queries per segment
    k_segs, v_segs, q_segs = k.split(sizes, dim=2), v.split(sizes, dim=2), q.split(q_sizes, dim=2)
    reads, bad_rows, written = [], torch.zeros(B, dtype=torch.long, device=k.device), 0
    for i, size in enumerate(sizes):
        if q_sizes[i]:
            reads.append(store.read(q_segs[i], first + written))
        if size < S and not write_partial:
            break
        bad_rows = bad_rows + store.write(k_segs[i], v_segs[i], first + written)
        written += 1
    if reads:
        outs = tuple(torch.cat(o, dim=2).to(q.dtype) for o in zip(*reads))
    else:
        outs = tuple(q.new_zeros(*q.shape[:2], 0, v.shape[-1]) for _ in range(parts))
    skipped = int(bad_rows.sum()) if check_finite else 0
    if skipped:
        warnings.warn(f"{where}: non-finite memory update in batch rows {bad_rows.nonzero().flatten().tolist()} "
                      f"skipped ({skipped} segment updates)")
    return outs, written, skipped


class BankedMemory:
    """One Infini memory, or N banks of it, during one scan (the working form of a MemoryState).

    Banks are kept as a list of (B, H, Dk, Dv) tensors: a write replaces one list entry, so the
    backward never materialises a full (B, N, ...) gradient per segment.
    """

    def __init__(self, state: MemoryState, batch: int, *, segments_per_bank: int, delta_rule: bool, scale: float,
                 eps: float, clamp: float | None, check_finite: bool):
        self.mems = list(state.memory.float().expand(batch, *state.memory.shape[1:]).unbind(1))
        self.zs = list(state.norm.float().expand(batch, *state.norm.shape[1:]).unbind(1))
        self.segments_per_bank, self.delta_rule, self.scale = segments_per_bank, delta_rule, scale
        self.eps, self.clamp, self.check_finite = eps, clamp, check_finite

    def read(self, q: torch.Tensor, n: int) -> tuple[torch.Tensor]:
        fq = phi(q, self.scale)
        terms = [read_terms(fq, m, z) for m, z in zip(self.mems, self.zs)]  # (B, H, t, Dv), (B, H, t, 1)
        num, den = terms[0] if len(terms) == 1 else (sum(t[0] for t in terms), sum(t[1] for t in terms))
        return (num / (den + self.eps),)  # eq. 3: A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1}), pooled over banks

    def write(self, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
        bank = (n // self.segments_per_bank) % len(self.mems)
        # eq. 4 (linear) or eq. 5 (delta rule) for M, and z_s = z_{s-1} + sum_t sigma(K_t)
        dm, dz = segment_update(phi(k, self.scale), v, self.mems[bank], self.zs[bank], self.delta_rule, self.eps)
        dm, dz, bad = guard_update(dm, dz, self.clamp, self.check_finite)
        self.mems[bank], self.zs[bank] = self.mems[bank] + dm, self.zs[bank] + dz
        return bad

    def state(self, segments: torch.Tensor, skipped) -> MemoryState:
        return MemoryState(torch.stack(self.mems, 1), torch.stack(self.zs, 1), segments, skipped)


def check_memory_state(where: str, state: MemoryState, batch: int, heads: int, key_dim: int, value_dim: int) -> None:
    if state.memory.shape[2:] != (heads, key_dim, value_dim) or state.memory.shape[0] not in (1, batch):
        raise NewLLMError(f"{where}: memory state {tuple(state.memory.shape)} does not fit "
                          f"(B={batch}, N, H={heads}, Dk={key_dim}, Dv={value_dim})")


def memory_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: MemoryState | None = None, *,
                segment_length: int, segments_per_bank: int = 1, delta_rule: bool = True,
                scale: float | None = None, eps: float = 1e-6, clamp: float | None = None,
                check_finite: bool = True, write_partial: bool = True):
    """Read and write the memory over a sequence, segment by segment (see the module docstring).

    Returns (A_mem (B, H, Tq, Dv) in q.dtype, new MemoryState). `scale=None` means 1/sqrt(Dk).
    Gradients flow into q, k, v and the initial state.
    """
    check_shapes("memory_scan", q, k, v)
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    if segment_length <= 0 or segments_per_bank <= 0:
        raise NewLLMError(f"memory_scan: segment_length and segments_per_bank must be > 0, got {segment_length}, "
                          f"{segments_per_bank}")
    if state is None:
        state = init_memory(B, H, Dk, Dv, device=k.device)
    check_memory_state("memory_scan", state, B, H, Dk, Dv)
    store = BankedMemory(state, B, segments_per_bank=segments_per_bank, delta_rule=delta_rule,
                         scale=Dk**-0.5 if scale is None else scale, eps=eps, clamp=clamp, check_finite=check_finite)
    (out,), written, skipped = scan_segments("memory_scan", q, k, v, store, first=int(state.segments),
                                             segment_length=segment_length, write_partial=write_partial,
                                             check_finite=check_finite)
    return out, store.state(state.segments + written, state.skipped + skipped)
