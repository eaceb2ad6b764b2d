"""Named presets and `create_model(name, **overrides)`.

A preset is a plain dict that cites where its numbers come from. Its layer stack is
`first + [rest] * (num_hidden_layers - len(first))`, so `num_hidden_layers=` resizes any preset.
Overrides use Hugging Face field names; each one goes to the model config and to every layer whose
config has that field, and an override that nothing has is an error (a typo never passes silently).
Adding a preset is one entry in `PRESETS`; a registered layer type's name builds a 2-layer stack
of it (resize with `num_hidden_layers=`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from newllm.config import ModelConfig, check_value, dataclass_from_dict
from newllm.errors import NewLLMError
from newllm.models.layers import LAYER_REGISTRY
from newllm.models.layers.base import ALIASES
from newllm.models.model import TransformerLM
from newllm.models.context import build_model

PYTHIA_70M = {  # EleutherAI/pythia-70m config.json
    "vocab_size": 50304, "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
    "intermediate_size": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000.0, "use_parallel_residual": True,
    "layer_norm_eps": 1e-5, "norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "norm": "layernorm",
}

SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M config.json
    "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "intermediate_size": 1536, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
    "norm_eps": 1e-5, "norm": "rmsnorm", "max_position_embeddings": 8192, "tie_word_embeddings": True,
}

#: Pythia-70m's sizes without the rotary fields, for stacks with no softmax-attention layer
MEMORY_70M = {k: v for k, v in PYTHIA_70M.items() if k not in ("rotary_pct", "rotary_emb_base")}

PRESETS: dict[str, dict[str, Any]] = {
    "pythia": {"first": [], "rest": "pythia", **PYTHIA_70M},
    # seed 001: 1 Infini layer (layer 0) + 5 Pythia layers at Pythia-70m sizes
    "infini": {"first": ["infini"], "rest": "pythia", **PYTHIA_70M},
    # seed 001: 1 MultiMemory / Hierarchical layer (layer 0) + 5 Pythia layers, num_memories=4 by default
    "multi_memory": {"first": ["multi_memory"], "rest": "pythia", **PYTHIA_70M},
    "hierarchical": {"first": ["hierarchical"], "rest": "pythia", **PYTHIA_70M},
    # the Infini-attention paper's model: EVERY layer a memory layer (segment-local attention + memory,
    # no positions), Pythia-70m sizes; past its segment a token reaches the output only through memory
    "infini_all": {"first": [], "rest": "infini", **MEMORY_70M},
    "multi_memory_all": {"first": [], "rest": "multi_memory", **MEMORY_70M},
    "llama": {"first": [], "rest": "llama", **SMOLLM2_135M},
    # a Llama-architecture stack (SmolLM2-135M sizes) whose layer 0 is an Infini layer in a Llama block
    # (RMSNorm, SwiGLU, GQA with the same q/k/v/o names): the shape a memory retrofit of SmolLM2 takes
    "llama_infini": {"first": ["infini"], "rest": "llama", **SMOLLM2_135M, "block": "llama"},
    # seed 001 "Context-Pythia": Pythia-70m sizes + x_t = embed(ids_t) + W_c h_{t-1} (newllm/models/context.py)
    "context_pythia": {"first": [], "rest": "pythia", **PYTHIA_70M, "context_feedback": {"init": "learned"}},
}


def register_preset(name: str, preset: dict[str, Any]) -> None:
    if "rest" not in preset:
        raise NewLLMError(f"preset {name!r} needs a 'rest' layer type")
    PRESETS[name] = preset


def model_names() -> list[str]:
    """What `create_model` builds: the presets, and every registered layer type (a stack of it)."""
    return sorted(set(PRESETS) | set(LAYER_REGISTRY))


def preset_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of preset `name` with `overrides` applied (see module doc). A registered
    layer type that is not a preset name builds a stack of that type with the model defaults, so a
    newly registered layer is `create_model("mylayer", ...)` with no preset written for it."""
    if name in PRESETS:
        preset = PRESETS[name]
    elif name in LAYER_REGISTRY:
        preset = {"first": [], "rest": name, "num_hidden_layers": 2}
    else:
        raise NewLLMError(f"unknown preset or layer type {name!r}; available: {model_names()}")
    fields = {k: v for k, v in preset.items()}
    for key, value in overrides.items():
        fields[ALIASES.get(key, key)] = value
    where = f"create_model({name!r})"
    first, rest = list(fields.pop("first")), fields.pop("rest")
    n = check_value(fields.pop("num_hidden_layers"), int, f"{where}: num_hidden_layers")
    if n < len(first) or n < 1:
        raise NewLLMError(f"{where}: num_hidden_layers must be >= {max(len(first), 1)}, got {n}")
    types = first + [rest] * (n - len(first))
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"layers"}
    used = set()
    layers = []
    for t in types:
        if t not in LAYER_REGISTRY:
            raise NewLLMError(f"{where}: unknown layer type {t!r}; registered: {sorted(LAYER_REGISTRY)}")
        cfg_fields = {f.name for f in dataclasses.fields(LAYER_REGISTRY[t].config_class)}
        spec = {k: v for k, v in fields.items() if k in cfg_fields}
        used |= set(spec)
        layers.append({"type": t, **dataclass_from_dict(LAYER_REGISTRY[t].config_class, spec, where).__dict__})
    model_kwargs = {k: v for k, v in fields.items() if k in model_fields}
    used |= set(model_kwargs)
    unknown = sorted(set(fields) - used)
    if unknown:
        raise NewLLMError(f"{where}: option(s) {unknown} match no field of the model or its layers "
                          f"({sorted(set(types))})")
    model_kwargs.setdefault("name", name)
    return dataclass_from_dict(ModelConfig, {"layers": layers, **model_kwargs}, where)


def create_model(name: str, **overrides) -> TransformerLM:
    """Build preset `name` (`"pythia"`, `"llama"`, the memory presets, or a registered layer type)
    with `overrides`.

    >>> model = create_model("pythia", vocab_size=512, hidden_size=64, num_attention_heads=4,
    ...                      intermediate_size=128, num_hidden_layers=2)
    """
    return build_model(preset_config(name, **overrides))  # ContextLM for recurrent presets
