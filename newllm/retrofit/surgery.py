"""Surgery on a loaded model: changed layer options, and attention layers turned into memory layers.

`with_layer_options(model, {3: {"sliding_window": 64}, ...})` returns a new model whose layer i is
rebuilt from its spec with those fields changed, with every weight copied from `model` (strictly: a
change that adds or drops a parameter is an error naming it). The original is left as it was. That
is how a window, attention sinks, or any other option of a pretrained layer is tried without
touching the file it came from.

`memory_from_attention(model, [0], kind="infini", adapter=False)` replaces attention layers by memory
layers initialised from them (Q/K/V/O, MLP, norms copied; GQA kept), or wraps them as parallel
adapters `original(x) + alpha * (new(x) - x)` (alpha 0: the original model, exactly).
"""
from __future__ import annotations

import copy

import torch

from newllm.errors import NewLLMError
from newllm.models.context import build_model


def with_layer_options(model, options: dict[int, dict]):
    """A copy of `model` whose layers `options` maps (index -> {field: value}) are rebuilt with those
    fields; weights copied, the held memory not."""
    n = len(model.layers)
    bad = sorted(i for i in options if not 0 <= i < n)
    if bad:
        raise NewLLMError(f"with_layer_options: layer indices {bad} outside 0..{n - 1}")
    config = copy.deepcopy(model.config)
    for i, changes in options.items():
        spec = config.layers[i]
        unknown = sorted(set(changes) - set(spec))
        if unknown:
            raise NewLLMError(f"with_layer_options: layer {i} ({spec['type']}) has no option(s) {unknown}")
        spec.update(changes)
    p = next(model.parameters())
    new = build_model(config).to(device=p.device, dtype=p.dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise NewLLMError(f"with_layer_options: the changed layers do not take the same weights (missing {missing}, "
                          f"unexpected {unexpected})")
    return new.train(model.training)


def memory_spec(spec: dict, kind: str = "infini", **options) -> dict:
    """The spec of a memory layer (`kind`: infini, multi_memory, hierarchical) with the sizes, heads,
    GQA and block of the attention layer `spec` (a pythia or llama layer), plus `options`."""
    from newllm.models.layers import LAYER_REGISTRY

    kinds = ("infini", "multi_memory", "hierarchical", "window_memory")
    if kind not in kinds:
        raise NewLLMError(f"memory_spec: kind must be one of {kinds}, got {kind!r}")
    t = spec["type"]
    if kind == "window_memory":  # RoPE kept: the window is the layer's own attention
        if t != "llama":
            raise NewLLMError(f"memory_spec: window_memory replaces a llama layer, got {t!r}")
        fields = {k: spec[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_key_value_heads",
                                       "rope_theta", "rms_norm_eps", "attention_bias", "mlp_bias", "initializer_range")}
        return {"type": kind, **LAYER_REGISTRY[kind].config_class(**{**fields, **options}).__dict__}
    if t == "llama":
        if spec["head_dim"] * spec["num_attention_heads"] != spec["hidden_size"]:
            raise NewLLMError(f"memory_spec: layer head_dim {spec['head_dim']} x {spec['num_attention_heads']} "
                              f"heads != hidden_size {spec['hidden_size']}; the memory mixer needs h * Dh = d")
        base = dict(block="llama", num_key_value_heads=spec["num_key_value_heads"], rms_norm_eps=spec["rms_norm_eps"],
                    attention_bias=spec["attention_bias"], mlp_bias=spec["mlp_bias"], hidden_act="silu")
    elif t == "pythia":
        base = dict(block="neox", layer_norm_eps=spec["layer_norm_eps"], attention_bias=spec["attention_bias"],
                    mlp_bias=True, hidden_act=spec["hidden_act"], use_parallel_residual=spec["use_parallel_residual"])
    else:
        raise NewLLMError(f"memory_spec: can replace a pythia or llama layer, got {t!r}")
    fields = dict(hidden_size=spec["hidden_size"], num_attention_heads=spec["num_attention_heads"],
                  intermediate_size=spec["intermediate_size"], initializer_range=spec["initializer_range"], **base)
    cls = LAYER_REGISTRY[kind]
    return {"type": kind, **cls.config_class(**{**fields, **options}).__dict__}


INITS = ("copy", "random")


def neox_qkv_to_split(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """GPT-NeoX's fused QKV rows, interleaved per head ([q0 k0 v0 | q1 k1 v1 | ...]), reordered to the
    memory mixer's [q | k | v] (each head-major): the same projections, rows permuted."""
    rest = weight.shape[1:]
    return weight.view(heads, 3, -1, *rest).transpose(0, 1).reshape(weight.shape)


def memory_from_attention(model, layers: list[int], kind: str = "infini", adapter: bool = False,
                          alpha_init: float = 0.0, init: str = "copy", **options):
    """A copy of `model` whose `layers` (pythia or llama attention layers) become memory layers
    initialised from them: Q/K/V/O, MLP and norms copied (GQA kept; GPT-NeoX's interleaved QKV rows
    reordered), the memory's own parameters (gate beta, feature maps, ...) at their init. The Infini
    kinds use no positions (NoPE, as the seed's Infini layer); `window_memory` keeps RoPE (the last
    `window` tokens through the layer's own softmax attention, older ones through the memory). With
    `adapter=True` each becomes a ParallelAdapter of the original layer and the memory layer
    (`alpha_init`: the seed's 0 gives the original's outputs exactly). `options` go to the memory
    layers' config (segment_length, ...).

    `init="random"` leaves the new layers (an adapter's new branch) at their own random init instead
    of copying the attention layer's weights: the seed's starting point, for comparison."""
    from newllm.models.layers import ParallelAdapter  # noqa: F401 (registers "parallel_adapter")

    n = len(model.layers)
    bad = sorted(i for i in layers if not 0 <= i < n)
    if bad:
        raise NewLLMError(f"memory_from_attention: layer indices {bad} outside 0..{n - 1}")
    if init not in INITS:
        raise NewLLMError(f"memory_from_attention: init must be one of {INITS}, got {init!r}")
    config = copy.deepcopy(model.config)
    for i in layers:
        old = config.layers[i]
        new = memory_spec(old, kind, **options)
        config.layers[i] = ({"type": "parallel_adapter", "original": old, "new": new, "alpha_init": alpha_init,
                             "hidden_size": old["hidden_size"]} if adapter else new)
    p = next(model.parameters())
    # the memory's own parameters have constant inits; the rest is copied below
    out = build_model(config).to(device=p.device, dtype=p.dtype)
    sd = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "layers" and int(parts[1]) in layers:
            i, rest = parts[1], ".".join(parts[2:])
            src = model.config.layers[int(i)]
            moved = t
            if src["type"] == "pythia" and rest.startswith("attention.query_key_value"):
                moved = neox_qkv_to_split(t, src["num_attention_heads"])
            if adapter:
                sd[f"layers.{i}.original.{rest}"] = t
                if init == "copy":
                    sd[f"layers.{i}.new.{rest}"] = moved
            elif init == "copy":
                sd[f"layers.{i}.{rest}"] = moved
        else:
            sd[name] = t
    missing, unexpected = out.load_state_dict(sd, strict=False)
    replaced = tuple(f"layers.{i}." + ("new." if adapter else "") for i in layers)
    own = [m for m in missing if not _memory_own(m) and not (init == "random" and m.startswith(replaced))]
    if own or unexpected:
        raise NewLLMError(f"memory_from_attention: weights do not map (missing {own}, unexpected {unexpected})")
    return out.train(model.training)


def _memory_own(name: str) -> bool:
    """Parameters a memory layer or adapter adds (initialised, not copied)."""
    return name.endswith((".beta", ".alpha", ".route_log_scale", ".expansion.weight", ".expansion.bias",
                          ".window_factor", ".feature_map.weight"))
