"""Trace points of a `TransformerLM`: one canonical name per tensor, captured with forward hooks.

    trace = trace_model(model, ids)            # ids (1, T); trace.tensors: name -> (T, C) float32
    trace.tensors["layers.3.attn_norm"]

Names (execution order; `{i}` is the layer index):

    embed
    layers.{i}.resid_pre     the layer's input (the residual stream)
    layers.{i}.attn_norm     input_layernorm's output
    layers.{i}.q, k, v       the projections' outputs, before RoPE (h Dh, hkv Dh channels)
    layers.{i}.q_rope, k_rope    q and k after RoPE (softmax attention), token-major (T, h Dh)
    layers.{i}.mem_local     memory mixers: the local (in-segment) attention     (T, h Dh)
    layers.{i}.mem_read      memory mixers: the memory read-out A_mem              (T, h Dh)
    layers.{i}.mem_gate      memory mixers: sigmoid(beta), one value per head      (1, h)
    layers.{i}.attn_ctx      the input of the output projection (o_proj / dense)
    layers.{i}.attn_out      the token mixer's output
    layers.{i}.resid_mid     x + attn_out (sequential residual only: the llama block, neox without
                             parallel residual)
    layers.{i}.ffn_norm      post_attention_layernorm's output
    layers.{i}.gate, up      SwiGLU's gate_proj and up_proj outputs (GELU MLP: `up` is dense_h_to_4h)
    layers.{i}.act           the input of the down projection (silu(gate) * up, or gelu(up))
    layers.{i}.mlp_out       the MLP's output
    layers.{i}.resid_post    the layer's output
    final_norm, logits

A point is read where it is a module's output (or input, for `resid_pre`, `attn_ctx`, `resid_mid`,
`act`); where it is neither, the layers call an identity `Tap` module on it (`q_rope`, `k_rope`,
`mem_*`), so hooks see it and the model's own code path and numbers stay as they are. A layer that
is not a `Block` (a user's own type) gives `resid_pre` and `resid_post` only.

Every point is stored as (T, C) float32 for batch entry 0 (a trace is of one sequence: the
reference sides, llama.cpp included, run one sequence), heads flattened into channels.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.attention import SoftmaxAttention
from newllm.models.layers.blocks import Block, SwiGLU
from newllm.models.layers.memory import MemoryMixer
from newllm.models.model import TransformerLM

#: the per-layer points, in execution order
LAYER_POINTS = ("resid_pre", "attn_norm", "q", "k", "v", "q_rope", "k_rope", "mem_local", "mem_read", "mem_gate",
                "attn_ctx", "attn_out", "resid_mid", "ffn_norm", "gate", "up", "act", "mlp_out", "resid_post")
#: each point's inputs (the points whose error it inherits), for the added-error rule of compare.py
INPUTS = {
    "resid_pre": (), "attn_norm": ("resid_pre",), "q": ("attn_norm",), "k": ("attn_norm",), "v": ("attn_norm",),
    "q_rope": ("q",), "k_rope": ("k",), "mem_local": ("q", "k", "v"), "mem_read": ("q", "k", "v"), "mem_gate": (),
    "attn_ctx": ("q_rope", "k_rope", "v", "mem_local", "mem_read", "mem_gate"), "attn_out": ("attn_ctx",),
    "resid_mid": ("resid_pre", "attn_out"), "ffn_norm": ("resid_mid", "resid_pre"), "gate": ("ffn_norm",),
    "up": ("ffn_norm",), "act": ("gate", "up"), "mlp_out": ("act",),
    "resid_post": ("resid_mid", "resid_pre", "attn_out", "mlp_out"),
}


def split_name(name: str) -> tuple[int | None, str]:
    """`layers.3.attn_norm` -> (3, "attn_norm"); `logits` -> (None, "logits")."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, name


def point_inputs(name: str, num_layers: int) -> list[str]:
    """The points `name` is computed from (what its error is measured against)."""
    layer, point = split_name(name)
    if layer is None:
        return {"embed": [], "final_norm": [f"layers.{num_layers - 1}.resid_post"] if num_layers else ["embed"],
                "logits": ["final_norm"]}.get(point, [])
    if point == "resid_pre":
        return [f"layers.{layer - 1}.resid_post" if layer else "embed"]
    return [f"layers.{layer}.{p}" for p in INPUTS.get(point, ())]


@dataclass
class Trace:
    """The captured points of one forward pass: name -> (T, C) float32, in execution order."""

    side: str  # "newllm", "transformers", "llama.cpp", or a model's name
    token_ids: list[int]
    tensors: dict[str, torch.Tensor]
    num_layers: int
    meta: dict = field(default_factory=dict)


def compile_points(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise NewLLMError(f"--points {pattern!r} is not a regular expression ({e})") from None


# ------------------------------------------------------------------ canonical layouts
def tokens_by_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (T, C) of batch 0, float32."""
    return x[0].detach().float().clone()


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, h, T, Dh) -> (T, h Dh)."""
    return x[0].detach().transpose(0, 1).reshape(x.shape[2], -1).float().clone()


def heads_last(x: torch.Tensor) -> torch.Tensor:
    """(B, T, h, Dh) -> (T, h Dh)."""
    return x[0].detach().reshape(x.shape[1], -1).float().clone()


def gate_layout(x: torch.Tensor) -> torch.Tensor:
    """(1, 1, h, 1) -> (1, h)."""
    return x.detach().reshape(1, -1).float().clone()


def neox_interleaved(part: int, heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """q (part 0), k (1) or v (2) of GPT-NeoX's fused projection, interleaved per head."""
    def get(x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x[0].detach().view(T, heads, 3, -1)[:, :, part].reshape(T, -1).float().clone()
    return get


def fused_chunk(part: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """q, k or v of a memory mixer's neox projection, read as [q | k | v] (TokenMixer.project)."""
    return lambda x: x[0].detach().chunk(3, dim=-1)[part].float().clone()


# ------------------------------------------------------------------ where each point is read
@dataclass(frozen=True)
class Probe:
    """Read point `name` from `module`'s output ("out") or first input ("in"), through `layout`."""

    name: str
    module: nn.Module
    where: str
    layout: Callable[[torch.Tensor], torch.Tensor] = tokens_by_channels


def block_probes(i: int, layer: nn.Module) -> list[Probe]:
    p = f"layers.{i}."
    probes = [Probe(p + "resid_pre", layer, "in"), Probe(p + "resid_post", layer, "out")]
    if not isinstance(layer, Block):
        return probes
    mixer = layer.mixer
    probes += [Probe(p + "attn_norm", layer.input_layernorm, "out"), Probe(p + "attn_out", mixer, "out")]
    if mixer.style == "llama":
        probes += [Probe(p + n, getattr(mixer, f"{n}_proj"), "out") for n in "qkv"]
    elif isinstance(mixer, SoftmaxAttention):
        probes += [Probe(p + n, mixer.query_key_value, "out", neox_interleaved(j, mixer.heads))
                   for j, n in enumerate("qkv")]
    else:
        probes += [Probe(p + n, mixer.query_key_value, "out", fused_chunk(j)) for j, n in enumerate("qkv")]
    if isinstance(mixer, SoftmaxAttention):
        probes += [Probe(p + "q_rope", mixer.tap_q_rope, "out", heads_first),
                   Probe(p + "k_rope", mixer.tap_k_rope, "out", heads_first)]
    if isinstance(mixer, MemoryMixer):
        probes += [Probe(p + "mem_local", mixer.tap_local, "out", heads_last),
                   Probe(p + "mem_read", mixer.tap_memory_read, "out", heads_last),
                   Probe(p + "mem_gate", mixer.tap_gate, "out", gate_layout)]
    out_proj = mixer.o_proj if mixer.style == "llama" else mixer.dense
    probes += [Probe(p + "attn_ctx", out_proj, "in"), Probe(p + "ffn_norm", layer.post_attention_layernorm, "out"),
               Probe(p + "mlp_out", layer.mlp, "out")]
    if not layer.parallel_residual:
        probes.append(Probe(p + "resid_mid", layer.post_attention_layernorm, "in"))
    if isinstance(layer.mlp, SwiGLU):
        probes += [Probe(p + "gate", layer.mlp.gate_proj, "out"), Probe(p + "up", layer.mlp.up_proj, "out"),
                   Probe(p + "act", layer.mlp.down_proj, "in")]
    else:
        probes += [Probe(p + "up", layer.mlp.dense_h_to_4h, "out"), Probe(p + "act", layer.mlp.dense_4h_to_h, "in")]
    return probes


def model_probes(model: TransformerLM) -> list[Probe]:
    """Every point of `model`, with where it is read."""
    if not isinstance(model, TransformerLM):
        raise NewLLMError(f"trace: expected a TransformerLM, got {type(model).__name__}")
    probes = [Probe("embed", model.embed, "out")]
    for i, layer in enumerate(model.layers):
        probes += block_probes(i, layer)
    return probes + [Probe("final_norm", model.norm, "out"), Probe("logits", model.lm_head, "out")]


def order_points(names, num_layers: int) -> list[str]:
    """Canonical execution order: embed, each layer's points in LAYER_POINTS order, final_norm, logits."""
    rank = {p: j for j, p in enumerate(LAYER_POINTS)}

    def key(n: str):
        layer, point = split_name(n)
        if layer is None:
            return {"embed": (-1, 0)}.get(point, (num_layers + 1, 0 if point == "final_norm" else 1))
        return layer, rank.get(point, len(rank))
    return sorted(names, key=key)


class Recorder:
    """Forward hooks that copy each probe's tensor into `tensors` (first call wins)."""

    def __init__(self, probes: list[Probe], keep: re.Pattern | None = None):
        self.tensors: dict[str, torch.Tensor] = {}
        self.handles = []
        for probe in probes:
            if keep is not None and not keep.search(probe.name):
                continue
            if probe.where == "in":
                self.handles.append(probe.module.register_forward_pre_hook(self._pre(probe)))
            else:
                self.handles.append(probe.module.register_forward_hook(self._post(probe)))

    def _store(self, probe: Probe, x) -> None:
        if isinstance(x, tuple):  # (y, state) of layers and mixers
            x = x[0]
        if probe.name not in self.tensors:
            self.tensors[probe.name] = probe.layout(x)

    def _pre(self, probe):
        return lambda module, args: self._store(probe, args[0])

    def _post(self, probe):
        return lambda module, args, out: self._store(probe, out)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def check_ids(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise NewLLMError(f"trace: token ids must be one non-empty sequence, got shape {tuple(ids.shape)}")
    return ids


@torch.no_grad()
def trace_model(model: TransformerLM, ids, points: str | None = None, side: str = "newllm") -> Trace:
    """Run `model` on `ids` (T,) or (1, T) from an empty state and capture every point (or those
    matching the regular expression `points`). The model's held memory is set aside and restored."""
    ids = check_ids(ids)
    keep = compile_points(points) if points else None
    rec = Recorder(model_probes(model), keep)
    try:
        with model.memory_aside(train=False):
            model(ids, state=model.init_state(1))
    finally:
        rec.close()
    n = len(model.layers)
    tensors = {k: rec.tensors[k] for k in order_points(rec.tensors, n)}
    return Trace(side, ids[0].tolist(), tensors, n, {"dtype": str(next(model.parameters()).dtype)})


# ------------------------------------------------------------------ statistics
def _quick(x: torch.Tensor) -> dict:
    """RMS and max |x| (with its channel) over the finite values, and the count of the others."""
    finite = torch.isfinite(x)
    a = torch.where(finite, x.abs(), torch.zeros_like(x))
    flat = int(a.argmax()) if a.numel() else 0
    C = x.shape[-1] if x.dim() else 1
    out = {"rms": float(a.pow(2).sum().div(max(int(finite.sum()), 1)).sqrt()),
           "max_abs": float(a.max()) if x.numel() else math.nan, "max_abs_channel": flat % C}
    if not bool(finite.all()):
        out["nonfinite"] = int((~finite).sum())
    return out


def point_stats(x: torch.Tensor, top: int = 5) -> dict:
    """Statistics of one (T, C) point: shape, dtype, RMS, mean, std, min, max, max |x| at (token,
    channel), NaN/Inf counts, the `top` channels by max |x| over tokens and max/median |x| (massive
    activations), and position 0 apart from the rest (`pos0`, `rest`)."""
    x = x.detach()
    dtype = str(x.dtype).replace("torch.", "")
    x = x.double()
    finite = torch.isfinite(x)
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    xf = x[finite] if (nan or inf) else x.reshape(-1)
    T, C = (x.shape[0], x.shape[-1]) if x.dim() >= 2 else (1, x.numel())
    a = torch.where(finite, x.abs(), torch.zeros_like(x)).reshape(T, C)
    flat = int(a.argmax()) if a.numel() else 0
    per_channel = a.max(dim=0).values
    k = min(top, C)
    vals, idx = per_channel.topk(k)
    median = float(a.median()) if a.numel() else math.nan
    out = {
        "shape": list(x.shape), "dtype": dtype,
        "rms": float(xf.pow(2).mean().sqrt()) if xf.numel() else math.nan,
        "mean": float(xf.mean()) if xf.numel() else math.nan,
        "std": float(xf.std(unbiased=False)) if xf.numel() else math.nan,
        "min": float(xf.min()) if xf.numel() else math.nan, "max": float(xf.max()) if xf.numel() else math.nan,
        "max_abs": float(a.max()) if a.numel() else math.nan, "max_abs_at": [flat // C, flat % C],
        "nan": nan, "inf": inf,
        "top_channels": [[int(i), float(v)] for i, v in zip(idx, vals)],
        "max_over_median": float(a.max()) / median if median > 0 else math.inf,
        "pos0": _quick(x.reshape(T, C)[:1]),
        "rest": _quick(x.reshape(T, C)[1:]) if T > 1 else None,
    }
    return out


def trace_stats(trace: Trace) -> dict[str, dict]:
    return {name: point_stats(t) for name, t in trace.tensors.items()}
