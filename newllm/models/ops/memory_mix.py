"""Several compressive memories read as an attention-weighted mixture (MultiMemory / Hierarchical layers).

Shapes: B batch, M memories, H memory heads, T tokens, S segment length, Dk / Dv key / value dims.
Built from the blocks of `ops/memory.py` (phi, read_terms, segment_update, guard_update); the
feature map, guards and fp32 arithmetic are the same as `memory_scan`'s.

Write rule (M1, round-robin, deterministic): segment number n, counted over the whole stream
(`state.segments`), is written into memory n % M, with the linear rule or the delta rule against
that memory alone; z_m accumulates sum_t phi(k_t) and a key sum K_m accumulates sum_t k_t (raw
keys) of the segments memory m received. Memory m has received c_m = ceil((n - m) / M) segments
after n segments (0 when n <= m), so its mean key is kbar_m = K_m / (c_m * S).

Read, for a query q of segment s (every memory as it was after segment s-1, as in memory_scan)::

    (M2) r_m   = phi(q) M_m / (phi(q) z_m + eps)                each memory's Infini read-out (eq. 3)
    (M3) w_m   = softmax_m( rho_h * q . kbar_m / sqrt(Dk) )     over the memories written so far
    (M4) A_mem = sum_m w_m r_m                                  (0 while no memory has been written)

The tags (M1)-(M4) mark the lines that compute them.

Why the mean raw key as each memory's summary: it is the centre of the keys the memory stored,
so q . kbar_m / sqrt(Dk) is the attention logit a query would give an "average" stored token (the
same scale as softmax attention), and it can be negative, unlike phi(q) z_m, whose positive
features make every memory look alike. rho_h (> 0, learned per memory head) sharpens or flattens
the choice; at rho = 0 the read is the plain average of the memories. Empty memories are masked
out so that an unwritten memory never dilutes the read.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from newllm.errors import NewLLMError
from newllm.models.ops.memory import (BankedMemory, MemoryState, check_memory_state, check_shapes, guard_update, phi,
                                      read_terms, scan_segments, segment_update)


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
    reads = num / (den + eps)  # (M2) each memory's read-out
    n_tok = torch.tensor([max(c, 1) * segment_length for c in counts], dtype=torch.float32, device=q.device)
    kbar = key_sum / n_tok.view(1, -1, 1, 1)  # (B, M, H, Dk): each memory's mean key
    logits = torch.einsum("bhtk,bmhk->bmht", q, kbar) * (Dk**-0.5) * route_scale.float().view(1, 1, H, 1)  # (M3)
    if not all(counts):  # unwritten memories take no part in the mix
        empty = torch.tensor([c == 0 for c in counts], device=q.device).view(1, -1, 1, 1)
        logits = logits.masked_fill(empty, float("-inf"))
    w = logits.softmax(dim=1)  # (M3) (B, M, H, t): weights over the memories
    return (w.unsqueeze(-1) * reads).sum(1)  # (M4)


class MixtureMemory:
    """M memories written round-robin and read as a mixture, during one scan (the working form of a
    MixtureState; one tensor per memory, replaced on write, as BankedMemory does with banks)."""

    def __init__(self, state: MixtureState, batch: int, *, segment_length: int, route_scale: torch.Tensor,
                 delta_rule: bool, scale: float, eps: float, clamp: float | None, check_finite: bool):
        self.mems, self.zs, self.ks = (list(t.float().expand(batch, *t.shape[1:]).unbind(1))
                                       for t in (state.memory, state.norm, state.key_sum))
        # the stacked (B, M, ...) tensors, rebuilt only after a write: a call that writes nothing (most
        # decoding steps) reads and returns the state's own tensors without copying them
        self.stacked = tuple(t.float().expand(batch, *t.shape[1:]) for t in (state.memory, state.norm, state.key_sum))
        self.S, self.route_scale, self.delta_rule, self.scale = segment_length, route_scale, delta_rule, scale
        self.eps, self.clamp, self.check_finite = eps, clamp, check_finite

    def stack(self):
        if self.stacked is None:
            self.stacked = (torch.stack(self.mems, 1), torch.stack(self.zs, 1), torch.stack(self.ks, 1))
        return self.stacked

    def read(self, q: torch.Tensor, n: int) -> tuple[torch.Tensor]:
        counts = segments_per_memory(n, len(self.mems))
        return (mixture_read(q.float(), phi(q, self.scale), *self.stack(), counts, self.S, self.route_scale,
                             self.eps),)

    def write(self, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
        m = n % len(self.mems)  # (M1) round-robin: segment n -> memory n % M
        dm, dz = segment_update(phi(k, self.scale), v, self.mems[m], self.zs[m], self.delta_rule, self.eps)
        dm, dz, bad = guard_update(dm, dz, self.clamp, self.check_finite)
        dk = torch.where(bad.view(-1, 1, 1), torch.zeros((), device=k.device), k.float().sum(-2))  # K_m += sum k
        self.mems[m], self.zs[m], self.ks[m] = self.mems[m] + dm, self.zs[m] + dz, self.ks[m] + dk
        self.stacked = None
        return bad

    def state(self, segments: torch.Tensor, skipped) -> MixtureState:
        return MixtureState(*self.stack(), segments, skipped)


def check_mixture(where: str, state: MixtureState | None, route_scale: torch.Tensor, batch: int, heads: int,
                  key_dim: int, value_dim: int) -> None:
    if state is None:
        raise NewLLMError(f"{where}: pass an initial state (init_mixture) to fix the number of memories")
    if state.memory.shape[2:] != (heads, key_dim, value_dim) or state.memory.shape[0] not in (1, batch):
        raise NewLLMError(f"{where}: memory state {tuple(state.memory.shape)} does not fit "
                          f"(B={batch}, M, H={heads}, Dk={key_dim}, Dv={value_dim})")
    if route_scale.shape != (heads,):
        raise NewLLMError(f"{where}: route_scale must have shape ({heads},), got {tuple(route_scale.shape)}")


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
    Dv = v.shape[-1]
    if segment_length <= 0:
        raise NewLLMError(f"mixture_scan: segment_length must be > 0, got {segment_length}")
    check_mixture("mixture_scan", state, route_scale, B, H, Dk, Dv)
    store = MixtureMemory(state, B, segment_length=segment_length, route_scale=route_scale, delta_rule=delta_rule,
                          scale=Dk**-0.5 if scale is None else scale, eps=eps, clamp=clamp, check_finite=check_finite)
    (out,), written, skipped = scan_segments("mixture_scan", q, k, v, store, first=int(state.segments),
                                             segment_length=segment_length, write_partial=write_partial,
                                             check_finite=check_finite)
    return out, store.state(state.segments + written, state.skipped + skipped)


class CoarseToFine:
    """A coarse Infini memory that absorbs every segment beside round-robin fine memories; a read
    returns both read-outs (the hierarchical layer mixes them with its expansion gate)."""

    def __init__(self, fine: MixtureMemory, coarse: BankedMemory):
        self.fine, self.coarse = fine, coarse

    def read(self, q: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.coarse.read(q, n)[0], self.fine.read(q, n)[0]

    def write(self, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
        return self.fine.write(k, v, n).long() + self.coarse.write(k, v, n).long()


def coarse_to_fine_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fine: MixtureState, coarse: MemoryState,
                        *, segment_length: int, route_scale: torch.Tensor, delta_rule: bool = True,
                        scale: float | None = None, eps: float = 1e-6, clamp: float | None = None,
                        check_finite: bool = True, write_partial: bool = True):
    """The fine mixture and one coarse memory read and written over the same segments, in one scan.

    Returns (A_coarse, A_fine (B, H, Tq, Dv) in q.dtype, new fine MixtureState, new coarse MemoryState);
    skipped updates of both levels are counted in the fine state's `skipped`.
    """
    check_shapes("coarse_to_fine_scan", q, k, v)
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    check_mixture("coarse_to_fine_scan", fine, route_scale, B, H, Dk, Dv)
    check_memory_state("coarse_to_fine_scan", coarse, B, H, Dk, Dv)
    opts = dict(delta_rule=delta_rule, scale=Dk**-0.5 if scale is None else scale, eps=eps, clamp=clamp,
                check_finite=check_finite)
    store = CoarseToFine(MixtureMemory(fine, B, segment_length=segment_length, route_scale=route_scale, **opts),
                         BankedMemory(coarse, B, segments_per_bank=1, **opts))
    (a_coarse, a_fine), written, skipped = scan_segments(
        "coarse_to_fine_scan", q, k, v, store, first=int(fine.segments), segment_length=segment_length,
        write_partial=write_partial, check_finite=check_finite, parts=2)
    segments = fine.segments + written
    return a_coarse, a_fine, store.fine.state(segments, fine.skipped + skipped), store.coarse.state(segments,
                                                                                                   coarse.skipped)
