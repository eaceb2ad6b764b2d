"""SoftmaxAttention: the causal softmax-attention token mixer, with a KV cache as its state.

    q, k, v = projections(x)                  (B, h, T, Dh), k/v with hkv heads (GQA: h = g * hkv)
    q, k    = rope(q), rope(k)                on the first `rotary_ndims` of each head (0: no positions)
    a       = softmax(q k^T / sqrt(Dh) + causal [+ window] mask) v
    out     = o(a)

Projections (see `blocks.TokenMixer`): "neox" is GPT-NeoX's fused `query_key_value`, interleaved
per head ((B, T, h, 3 Dh): q, k, v of head 0, then of head 1, ...), rotated with the fused
`split_qkv_rope`; "llama" is `q_proj`/`k_proj`/`v_proj`/`o_proj` with grouped-query attention.

State (`KVCache`): every key and value seen so far, already rotated, and the next position. With
`sliding_window` W each query sees its W most recent keys (itself included), inside one call and
across calls alike, and the cache keeps only the last W - 1 (all a future query can see). With
`attention_sinks` s as well, the first s tokens stay visible to every query (StreamingLLM, arXiv
2309.17453) and the cache keeps them in front of the recent W - 1.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from newllm.errors import NewLLMError

from newllm.models.layers.base import StateField
from newllm.models.layers.blocks import Tap, TokenMixer
from newllm.models.ops.attention import causal_attention
from newllm.models.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq, split_qkv_rope


class KVCache(NamedTuple):
    """State of a softmax-attention layer: keys/values seen so far and the next position.

    k, v: (B, hkv, Tc, Dh), already rotated (RoPE applied) so they are reused as they are;
    pos: 0-dim int64 tensor, the absolute position of the next token. With a sliding window W only
    the last W-1 keys are kept (all a future query can see); with s attention sinks, the first s
    keys are kept in front of them (positions: `cache_positions`).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor


#: buffer -> [end of the keys the newest view holds, end of everything ever written into it] along the
#: key axis. A cache is a view buf[..., a:b, :] of a preallocated buffer; the next call writes its keys
#: at b.. in place only when nothing has been written there yet (b is the newest end and the
#: high-water mark), so an old state extended twice (two branches from one prefix) never sees the
#: other's keys: the second extension copies into a fresh buffer. Below the high-water mark (after a
#: windowed cache moved its keys to the front) a write also needs that no tensor but the state being
#: extended views the buffer. Keyed by id(buffer); dropped when its buffer is freed (weakref.finalize).
_FILLED: dict[int, list[int]] = {}


def _grow(old: torch.Tensor, new: torch.Tensor, spare: int) -> torch.Tensor:
    """old ++ new along the key axis, in a fresh buffer with room for `spare` more keys; the view of
    the written part."""
    n, T = old.shape[-2], new.shape[-2]
    buf = new.new_empty((*new.shape[:-2], n + T + spare, new.shape[-1]))
    buf[..., :n, :].copy_(old)
    buf[..., n:n + T, :].copy_(new)
    _FILLED[id(buf)] = [n + T, n + T]
    weakref.finalize(buf, _FILLED.pop, id(buf), None)
    return buf[..., :n + T, :]


def _views_of(t: torch.Tensor) -> int:
    """How many tensors share t's storage (the storage's use count; reading it adds one reference)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1


def _append(old: torch.Tensor, new: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """old ++ new (keys or values), written in place after `old` when `old` is the written end of a
    preallocated buffer with room (module-level `_FILLED`), else copied into a buffer with spare room
    (half as much again, at least 32 keys), so decoding copies the cache O(1) times per token
    amortised instead of once per token. Under autograd it is a plain concatenation: an in-place
    write would invalidate the graph of the earlier views.

    With a sliding window (`keep` = W - 1, the keys a state holds), once the window is full the next
    buffer has room for 2 (keep + T) keys, and when that is full the kept keys move to its front
    instead of into a new buffer, but only when no tensor but `old` views the buffer (its storage's
    use count: the buffer and `old`), so no state anyone holds is written; `old` itself lies behind
    the region written. The buffer then stays one size however long the stream, and streaming with
    a window never holds an old and a new buffer at once."""
    old = old.to(new.dtype)
    if torch.is_grad_enabled() and (new.requires_grad or old.requires_grad):
        return torch.cat((old, new), dim=-2)
    T = new.shape[-2]
    base = old._base
    if (base is not None and id(base) in _FILLED and base.dtype == new.dtype and base.device == new.device
            and base.dim() == old.dim() and base.shape[:-2] == old.shape[:-2] == new.shape[:-2]
            and base.shape[-1] == old.shape[-1] == new.shape[-1] and old.stride() == base.stride()):
        a = (old.storage_offset() - base.storage_offset()) // base.shape[-1]
        b = a + old.shape[-2]
        filled = _FILLED[id(base)]
        if filled[0] == b and b + T <= base.shape[-2] and (b >= filled[1] or _views_of(old) == 2):
            base[..., b:b + T, :].copy_(new)
            filled[0], filled[1] = b + T, max(filled[1], b + T)
            return base[..., a:b + T, :]
        n = old.shape[-2] + T
        if keep is not None and old.shape[-2] <= keep and n <= a and _views_of(old) == 2:
            base[..., :n - T, :].copy_(old)  # the front [0, n) lies before old's [a, b): old is not written
            base[..., n - T:n, :].copy_(new)
            filled[0] = n  # the high-water mark stays: what lies above n may still be viewed (by old)
            return base[..., :n, :]
    n = old.shape[-2] + T
    spare = max(n // 2, 32)
    if keep is not None and old.shape[-2] >= keep:  # a full window: room for the front move above, 2 (keep + T)
        spare = max(spare, 2 * (keep + T) - n)
    return _grow(old, new, spare)


def extend_kv_cache(
    state: KVCache | None, k: torch.Tensor, v: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, KVCache]:
    """Append this call's k/v to the cache (`_append`: in place in a preallocated buffer where
    nothing else has written). Returns (k_all, v_all, k_start, new_state); the new state is a view
    of the last keys (all of them, or the last W - 1 with a window), and nothing writes inside it."""
    if state is None:  # no copy: the first call that continues this state moves it into a buffer
        k_all, v_all, start = k, v, 0
    else:
        keep = None if window is None else max(window - 1, 0)
        k_all, v_all = _append(state.k, k, keep), _append(state.v, v, keep)
        start = int(state.pos) - state.k.shape[-2]
    pos = start + k_all.shape[-2]
    keep_k, keep_v = k_all, v_all
    if window is not None:
        keep = max(window - 1, 0)
        keep_k = k_all[..., k_all.shape[-2] - min(keep, k_all.shape[-2]):, :]
        keep_v = v_all[..., v_all.shape[-2] - keep_k.shape[-2]:, :]
    new_state = KVCache(keep_k, keep_v, torch.tensor(pos, dtype=torch.long))
    return k_all, v_all, start, new_state


def check_window(owner: str, sliding_window: int | None, sinks: int) -> None:
    """The config check of a window and its sinks (one-line errors naming the layer type)."""
    if sliding_window is not None and sliding_window <= 0:
        raise NewLLMError(f"{owner}: sliding_window must be > 0, got {sliding_window}")
    if sinks < 0 or (sinks and sliding_window is None):
        raise NewLLMError(f"{owner}: attention_sinks must be >= 0 and needs a sliding_window (without one every token "
                          f"is visible anyway), got attention_sinks={sinks}, sliding_window={sliding_window}")


def cache_positions(length: int, pos: int, sinks: int, device=None) -> torch.Tensor:
    """Positions of a cache of `length` keys before position `pos`: 0..pos-1 while nothing has left
    it, else the s sinks 0..s-1 followed by the most recent keys."""
    if length == pos:
        return torch.arange(pos, device=device)
    return torch.cat((torch.arange(sinks, device=device), torch.arange(pos - (length - sinks), pos, device=device)))


class SoftmaxAttention(TokenMixer):
    """Causal softmax attention over a KV cache (module docstring)."""

    state_type = KVCache

    def __init__(self, *, style: str, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool, rotary_ndims: int, rope_base: float, sliding_window: int | None, sinks: int = 0):
        super().__init__()
        self.build_projections(style, hidden_size, num_heads, num_kv_heads, head_dim, bias)
        self.rotary_ndims, self.sliding_window, self.sinks = rotary_ndims, sliding_window, sinks
        self.register_buffer("inv_freq", rope_inv_freq(rotary_ndims, rope_base), persistent=False)
        self.tap_q_rope, self.tap_k_rope = Tap(), Tap()  # q/k after RoPE, for newllm.diagnostics

    @property
    def uses_positions(self) -> bool:
        return self.rotary_ndims > 0

    @property
    def attention_span(self) -> int | None:
        """W - 1 with a window of W keys (the query itself and W - 1 before it); None with full
        attention or with sinks (the first tokens stay visible at any distance)."""
        if self.sliding_window is None or self.sinks:
            return None
        return self.sliding_window - 1

    def state_spec(self) -> dict[str, StateField]:
        kv = StateField((self.kv_heads, None, self.head_dim))
        return {"k": kv, "v": kv, "pos": StateField((), torch.long, batched=False)}

    def tokens_absorbed(self, state: KVCache) -> int:
        return int(state.pos)

    def qkv(self, x: torch.Tensor, start: int):
        """Rotated q (B, h, T, Dh), k and v (B, hkv, T, Dh) for positions start.. ."""
        B, T, _ = x.shape
        h, Dh = self.heads, self.head_dim
        positions = torch.arange(start, start + T, device=x.device)
        if self.style == "neox":
            qkv = self.query_key_value(x)  # (B, T, 3 h Dh), interleaved per head
            if self.rotary_ndims:
                cos, sin = rope_cos_sin(self.inv_freq, positions, qkv.dtype)
                return split_qkv_rope(qkv, h, cos, sin)  # one fused autograd node
            return qkv.view(B, T, h, 3 * Dh).transpose(1, 2).split(Dh, dim=-1)
        q = self.q_proj(x).view(B, T, h, Dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, Dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, Dh).transpose(1, 2)
        cos, sin = rope_cos_sin(self.inv_freq, positions, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, state: KVCache | None = None):
        B, T, _ = x.shape
        start = 0 if state is None else int(state.pos)
        q, k, v = self.qkv(x, start)
        q, k = self.tap_q_rope(q), self.tap_k_rope(k)
        if self.sinks:
            return self.forward_with_sinks(q, k, v, state, start)
        k_all, v_all, k_start, new_state = extend_kv_cache(state, k, v, self.sliding_window)
        out = causal_attention(q, k_all, v_all, start, k_start, self.head_dim**-0.5, self.sliding_window)
        return self.output(out.transpose(1, 2).reshape(B, T, -1)), new_state

    def forward_with_sinks(self, q, k, v, state: KVCache | None, start: int):
        """The window plus the first `sinks` tokens (the cache is not contiguous: explicit positions)."""
        B, _, T, _ = q.shape
        if state is None:
            k_all, v_all, pos_k = k, v, torch.arange(start, start + T, device=q.device)
        else:
            k_all, v_all = torch.cat((state.k.to(k.dtype), k), dim=-2), torch.cat((state.v.to(v.dtype), v), dim=-2)
            pos_k = torch.cat((cache_positions(state.k.shape[-2], start, self.sinks, q.device),
                               torch.arange(start, start + T, device=q.device)))
        out = causal_attention(q, k_all, v_all, start, 0, self.head_dim**-0.5, self.sliding_window, self.sinks,
                               k_positions=pos_k)
        end = start + T
        keep = ((pos_k < self.sinks) | (pos_k >= end - (self.sliding_window - 1))).nonzero().flatten()
        new_state = KVCache(k_all.index_select(-2, keep), v_all.index_select(-2, keep),
                            torch.tensor(end, dtype=torch.long))
        return self.output(out.transpose(1, 2).reshape(B, T, -1)), new_state
