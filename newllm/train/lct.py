"""Lagged Cache Training (LCT, seed 001's core method) and its exact sequential baseline.

A recurrent model (`ContextLM`, x_t = embed(ids_t) + W_c h_{t-1}) is sequential when used exactly:
token t needs h_{t-1}. Three ways to train it, one loss function each:

* `sequential_loss` (the baseline): teacher-forced, token by token with the KV caches carried,
  gradients through the recurrence (`bptt_truncate=k` detaches h every k tokens). T stack calls
  per window.
* `lct_loss` (the seed's method): a cache holds, per training sample, the final hidden states h
  (T, d) that the previous visit of that sample produced. The step feeds them shifted by one as the
  context (position t reads the cached h_{t-1}, position 0 reads h_{-1}), runs ONE parallel pass,
  takes the loss, and replaces the sample's cache by the new hidden states, detached. Gradients do
  not flow through the cache: the lag is the approximation, and as the weights move slowly the
  cache follows them.
  The cache is keyed by sample id (the dataset index of the window), not by batch position, so it
  survives shuffling (the seed keyed by batch index, which is only right without shuffling).
  Beyond the seed:
  - `refresh_sweeps=k`: k extra no-grad parallel sweeps h <- F(shift(h)) before the gradient pass
    (Jacobi iteration on the causal recurrence). Each sweep makes at least one more leading
    position exact, so k = T-1 gives the exact recurrence; k = 0 is the seed's method.
  - warm-up: a sample seen for the first time gets `warmup_sweeps` no-grad sweeps starting from a
    zero context (1 sweep = the seed's "forward without context"), or the exact recurrence
    (`warmup_exact=True`, T sequential no-grad steps, once per sample).
* "parallel" (`step_loss(mode="parallel")`): the model's own forward, `model(ids, labels=ids)`. For a
  ContextLM that *is* the exact recurrence with full gradients; for a plain TransformerLM it is
  ordinary training.

Staleness: `lct_loss(..., measure_staleness=True)` also runs the exact recurrence (no grad) on the
batch and reports mean |h_context - h_exact| over the positions fed as context, before and after
the refresh sweeps, absolute and relative to mean |h_exact|.

Evaluation never uses the cache: `model(ids)` of a ContextLM is the exact recurrence, so any
evaluator that calls the model takes the exact path (seed rule: train and evaluate under the same
conditions).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from newllm.config import DTYPES, MODEL_DTYPES
from newllm.errors import NewLLMError
from newllm.models.context import ContextLM, shift_context
from newllm.models.model import TransformerLM

MODES = ("parallel", "sequential", "lct")


@dataclass
class LCTConfig:
    """Options of the recurrent training modes (the `lct:` section of a training recipe)."""

    refresh_sweeps: int = 0  # extra no-grad parallel sweeps per step; 0 = the seed's LCT
    warmup_sweeps: int = 1  # no-grad sweeps filling a new sample's cache (seed: one pass without context)
    warmup_exact: bool = False  # fill a new sample's cache with the exact recurrence instead
    cache_dtype: str = "float32"  # storage dtype of cached hidden states ("bfloat16" halves the memory)
    cache_device: str | None = None  # None: the model's device; "cpu" keeps a large cache off the GPU
    staleness_every: int = 50  # measure staleness every k optimizer steps (an exact no-grad pass); 0 = never
    bptt_truncate: int | None = None  # sequential mode: detach h every k tokens; None = full BPTT

    def __post_init__(self):
        for key in ("refresh_sweeps", "warmup_sweeps", "staleness_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise NewLLMError(f"lct: {key} must be an integer >= 0, got {value!r}")
        if self.cache_dtype not in MODEL_DTYPES:
            raise NewLLMError(f"lct: cache_dtype must be one of {sorted(MODEL_DTYPES)}, got {self.cache_dtype!r}")
        if self.bptt_truncate is not None and (not isinstance(self.bptt_truncate, int) or self.bptt_truncate <= 0):
            raise NewLLMError(f"lct: bptt_truncate must be a positive integer or null, got {self.bptt_truncate!r}")


class HiddenCache:
    """Last visit's final hidden states, one (T, d) tensor per sample id.

    Keyed by the sample's id (an int: the window's index in the dataset), so a shuffled order finds
    each sample's own states. Stored detached, in `dtype` on `device`.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.dtype, self.device = dtype, device
        self._store: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, sample_id: int) -> bool:
        return int(sample_id) in self._store

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def clear(self) -> None:
        self._store.clear()

    def gather(self, sample_ids: list[int], T: int, d: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (B, T, d), found (B,) bool); rows of unseen samples are zeros."""
        h = torch.zeros(len(sample_ids), T, d, device=device, dtype=dtype)
        found = torch.zeros(len(sample_ids), dtype=torch.bool)
        for row, sid in enumerate(sample_ids):
            entry = self._store.get(sid)
            if entry is None:
                continue
            if entry.shape != (T, d):
                raise NewLLMError(f"LCT cache: sample id {sid} has cached hidden states of shape "
                                  f"{tuple(entry.shape)}, the batch needs {(T, d)} (same id for a different window?)")
            h[row] = entry.to(device=device, dtype=dtype)
            found[row] = True
        return h, found

    def update(self, sample_ids: list[int], h: torch.Tensor) -> None:
        """Store h[row] (T, d), detached, as the cache of sample_ids[row] (last write wins)."""
        if h.shape[0] != len(sample_ids):
            raise NewLLMError(f"LCT cache: {len(sample_ids)} sample ids for hidden states of batch {h.shape[0]}")
        h = h.detach().to(dtype=self.dtype, device=self.device or h.device)
        for row, sid in enumerate(sample_ids):
            self._store[sid] = h[row].clone()  # clone: do not keep the whole batch tensor alive


@dataclass
class LCTStepInfo:
    loss: torch.Tensor  # scalar, with its graph
    num_warmed: int  # samples whose cache was filled by the warm-up in this step
    staleness: float | None = None  # mean |h_context - h_exact| after the refresh sweeps (what was fed)
    staleness_cached: float | None = None  # the same for the cache as stored (before the refresh sweeps)
    staleness_rel: float | None = None  # staleness / mean |h_exact|
    measure_s: float = 0.0  # seconds spent measuring staleness (an exact pass; not part of the method's cost)


def as_sample_ids(sample_ids, batch_size: int) -> list[int]:
    ids = sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else [int(s) for s in sample_ids]
    if len(ids) != batch_size:
        raise NewLLMError(f"LCT: {len(ids)} sample ids for a batch of {batch_size} windows")
    return ids


def require_context_model(model, mode: str) -> ContextLM:
    if not isinstance(model, ContextLM):
        raise NewLLMError(f"training mode {mode!r} needs a recurrent model (preset context_pythia), "
                          f"got {type(model).__name__} ({model.config.name})")
    return model


def lct_loss(model: ContextLM, input_ids: torch.Tensor, sample_ids, cache: HiddenCache, config: LCTConfig,
             labels: torch.Tensor | None = None, measure_staleness: bool = False) -> LCTStepInfo:
    """One LCT step's loss (see module doc); updates `cache` for these samples."""
    model = require_context_model(model, "lct")
    check_no_held_memory(model)
    B, T = input_ids.shape
    sids = as_sample_ids(sample_ids, B)
    d, dtype = model.config.hidden_size, model.embed.weight.dtype
    h, found = cache.gather(sids, T, d, input_ids.device, dtype)  # (B, T, d)
    missing = (~found).nonzero().flatten().tolist()
    if missing:
        new = input_ids[missing]
        with torch.no_grad():
            if config.warmup_exact:
                warm = model.run_recurrence(new)[0]
            else:
                warm = model.jacobi_hidden(new, None, config.warmup_sweeps)
        h[missing] = warm.to(dtype)
    h_cached = h
    if config.refresh_sweeps:
        h = model.jacobi_hidden(input_ids, h, config.refresh_sweeps)
    context = shift_context(h, model.initial_context(B))  # position 0 reads h_{-1} (with its gradient)
    out, h_new = model.forward_lagged(input_ids, context, labels=input_ids if labels is None else labels)
    cache.update(sids, h_new)
    info = LCTStepInfo(loss=out.loss, num_warmed=len(missing))
    if measure_staleness:
        t0 = time.perf_counter()
        with torch.no_grad():
            exact = model.run_recurrence(input_ids)[0][:, :-1]
            scale = exact.abs().mean()
            info.staleness = float((h[:, :-1] - exact).abs().mean())
            info.staleness_cached = float((h_cached[:, :-1] - exact).abs().mean())
            info.staleness_rel = info.staleness / float(scale)
        info.measure_s = time.perf_counter() - t0
    return info


def check_no_held_memory(model: ContextLM) -> None:
    """Training windows start from an empty state; a held memory would silently leak into them."""
    if model.get_memory_state() is not None:
        raise NewLLMError("LCT/sequential training: the model holds a memory state (update_memory=True was used); "
                          "call model.reset_memory() first so training windows start from an empty state")


def sequential_loss(model: ContextLM, input_ids: torch.Tensor, config: LCTConfig,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """The exact, teacher-forced recurrence with gradients through h (truncated by bptt_truncate)."""
    model = require_context_model(model, "sequential")
    check_no_held_memory(model)
    return model.recurrent_loss(input_ids, input_ids if labels is None else labels, config.bptt_truncate)


def step_loss(mode: str, model: TransformerLM, input_ids: torch.Tensor, sample_ids=None,
              cache: HiddenCache | None = None, config: LCTConfig | None = None,
              labels: torch.Tensor | None = None, measure_staleness: bool = False) -> LCTStepInfo:
    """The training loss of one micro-batch in `mode` ("parallel", "sequential" or "lct")."""
    config = config or LCTConfig()
    labels = input_ids if labels is None else labels
    if mode == "parallel":
        return LCTStepInfo(loss=model(input_ids, labels=labels).loss, num_warmed=0)
    if mode == "sequential":
        return LCTStepInfo(loss=sequential_loss(model, input_ids, config, labels), num_warmed=0)
    if mode == "lct":
        if sample_ids is None or cache is None:
            raise NewLLMError("mode 'lct' needs the batch's sample ids and a HiddenCache")
        return lct_loss(model, input_ids, sample_ids, cache, config, labels, measure_staleness)
    raise NewLLMError(f"unknown training mode {mode!r}; choose one of {MODES}")


def make_cache(model: TransformerLM, config: LCTConfig) -> HiddenCache:
    device = config.cache_device or next(model.parameters()).device
    return HiddenCache(dtype=DTYPES[config.cache_dtype], device=device)
