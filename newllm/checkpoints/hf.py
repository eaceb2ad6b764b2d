"""Hugging Face checkpoint folders (GPT-NeoX / Pythia, Llama, Mistral) -> `TransformerLM`.

A folder holds `config.json` and its weights in one of (first found wins, as in `transformers`):

* `model.safetensors`
* `model.safetensors.index.json` + the shards it names
* `pytorch_model.bin` or `pytorch_model.bin.index.json` + shards, read with
  `torch.load(weights_only=True)` (no arbitrary pickle from a downloaded file)

Config: `model_type` picks the layer type ("gpt_neox" -> `PythiaLayer`, "llama" / "mistral" ->
`LlamaLayer`). RoPE settings are read from both spellings: transformers 5 writes
`rope_parameters = {"rope_type", "rope_theta", "partial_rotary_factor"}`, older files carry
`rotary_pct` / `rotary_emb_base` (GPT-NeoX), `rope_theta` (Llama) and `rope_scaling`. A value in
`rope_parameters` wins over the top-level key, as in transformers' `convert_rope_params_to_dict`.
Only plain RoPE (`rope_type` "default") is implemented; scaled variants (linear, dynamic, yarn,
llama3, ...) change the frequencies and are rejected rather than silently mis-loaded. A missing key
takes transformers' class default for that architecture (e.g. `rms_norm_eps` 1e-6 for Llama).

Weights: HF names map one to one onto ours (tables below); the base-model prefix (`gpt_neox.`,
`model.`) is optional, as `transformers` accepts checkpoints of the bare base model, and GPT-NeoX's
head may be called `embed_out` (on disk) or `lm_head` (transformers 5's in-memory name, so a
`torch.save(model.state_dict())` file loads too). Old Pythia
checkpoints carry non-weight buffers (`attention.bias` / `attention.masked_bias`: causal masks,
`rotary_emb.inv_freq`): they are dropped by name. Any other unknown tensor, a missing one, or a
shape mismatch is a `NewLLMError` naming the tensor (HF name) and the file. With tied embeddings
the head may be absent (or present and ignored, as transformers ties it to the embedding).

Tensors are read one at a time (safetensors lazily, .bin memory-mapped) and copied into the model,
so peak memory stays near one model's size.
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from pickle import UnpicklingError  # only to recognise torch.load's error for a damaged .bin
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from newllm.checkpoints.native import expected_shapes
from newllm.config import MODEL_DTYPES, ModelConfig, check_value, dataclass_from_dict
from newllm.errors import NewLLMError
from newllm.files import contained
from newllm.models.layers.llama import LlamaLayerConfig
from newllm.models.layers.pythia import ACTIVATIONS, PythiaLayerConfig
from newllm.models.model import TransformerLM

__all__ = ["load_hf_model", "hf_config", "hf_to_ours", "ARCHITECTURES"]

# ------------------------------------------------------------------ names
#: per-architecture: base-model prefix, top-level names (HF -> ours), the per-layer names (the same in
#: both: our blocks carry Hugging Face's module names), the head's HF name, and patterns of buffers
#: that old checkpoints carry and we drop
NAMES: dict[str, dict[str, Any]] = {
    "gpt_neox": {
        "prefix": "gpt_neox.",
        "top": {"embed_in": "embed", "final_layer_norm": "norm"},
        "head": "embed_out",
        "layer": ("input_layernorm", "post_attention_layernorm", "attention.query_key_value", "attention.dense",
                  "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        "drop": re.compile(r"^(gpt_neox\.)?(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"
                           r"|rotary_emb\.inv_freq)$"),
    },
    "llama": {
        "prefix": "model.",
        "top": {"embed_tokens": "embed", "norm": "norm"},
        "head": "lm_head",
        "layer": ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        "drop": re.compile(r"^(model\.)?(layers\.\d+\.self_attn\.rotary_emb\.inv_freq|rotary_emb\.inv_freq)$"),
    },
}
NAMES["mistral"] = NAMES["llama"]

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_ours(name: str, model_type: str) -> str | None:
    """`gpt_neox.layers.3.attention.dense.weight` -> `layers.3.attention.dense.weight`; None if not a known name."""
    t = NAMES[model_type]
    if name.startswith(t["prefix"]):
        name = name[len(t["prefix"]):]
    else:
        for head in (t["head"], "lm_head"):  # transformers 5 calls GPT-NeoX's embed_out lm_head in memory
            if name.startswith(head + "."):
                return "lm_head." + name[len(head) + 1:]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in t["layer"]:
        return f"layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    module, _, param = name.rpartition(".")
    if module in t["top"] and param in ("weight", "bias"):
        return f"{t['top'][module]}.{param}"
    return None


def ours_to_hf(name: str, model_type: str) -> str:
    """Inverse of `hf_to_ours` (with the prefix), for error messages about missing tensors."""
    t = NAMES[model_type]
    module, _, param = name.rpartition(".")
    if module == "lm_head":
        return f"{t['head']}.{param}"
    if _LAYER_RE.match(name):
        return f"{t['prefix']}{name}"
    inverse = {v: k for k, v in t["top"].items()}
    return f"{t['prefix']}{inverse[module]}.{param}"


# ------------------------------------------------------------------ config
_REQUIRED = object()


class _Reader:
    """`config.json` as a dict, with one-line errors that name the file and the key."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NewLLMError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(self.d, dict):
            raise NewLLMError(f"{path}: expected a JSON object, got {type(self.d).__name__}")

    def get(self, key: str, default: Any = _REQUIRED, kind: Callable = None) -> Any:
        value = self.d.get(key)
        if value is None:
            if default is _REQUIRED:
                raise NewLLMError(f"{self.path}: no {key!r}")
            return default
        if kind is not None:  # strict: "false" is no bool, 64.5 no int (newllm.config.check_value)
            try:
                return check_value(value, kind, repr(key))
            except NewLLMError as e:
                raise NewLLMError(f"{self.path}: {e}") from None
        return value


def _rope(cfg: _Reader, default_partial: float) -> tuple[float, float]:
    """(theta, partial_rotary_factor) from either spelling (module doc); rejects scaled RoPE.

    Both `rope_parameters` and `rope_scaling` are read when both are present: transformers applies
    a scaling that either names (a file with plain `rope_parameters` and `rope_scaling: {type: yarn}`
    runs YaRN there), so a scaled type in either is refused rather than loaded as plain RoPE."""
    sources = {key: cfg.get(key, None) for key in ("rope_parameters", "rope_scaling")}
    for key, value in sources.items():
        if value is not None and not isinstance(value, dict):
            raise NewLLMError(f"{cfg.path}: {key!r} must be an object, got {value!r}")
        rope_type = (value or {}).get("rope_type", (value or {}).get("type", "default"))
        if rope_type != "default":
            raise NewLLMError(f"{cfg.path}: RoPE type {rope_type!r} is not supported ({key!r} asks for it; only "
                              "'default' RoPE is implemented, and a scaled RoPE loaded as plain RoPE gives wrong logits)")
    params = sources["rope_parameters"] or sources["rope_scaling"] or {}
    def first(*values):  # the first value that is set (0.0 is a value: rotary_pct 0 means no RoPE)
        return next(v for v in values if v is not None)

    theta = first(params.get("rope_theta"), cfg.get("rope_theta", None), cfg.get("rotary_emb_base", 10000.0))
    partial = first(params.get("partial_rotary_factor"), cfg.get("rotary_pct", None),
                    cfg.get("partial_rotary_factor", default_partial))
    try:
        return check_value(theta, float, "RoPE theta"), check_value(partial, float, "rotary fraction")
    except NewLLMError as e:
        raise NewLLMError(f"{cfg.path}: {e}") from None


def _token_id(cfg: _Reader, key: str, default: int | None) -> int | None:
    """bos/eos id; a list (Llama 3 has several eos ids) gives its first entry."""
    value = cfg.d[key] if key in cfg.d else default  # an explicit null means "none", not the default
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return check_value(value, int | None, repr(key))
    except NewLLMError as e:
        raise NewLLMError(f"{cfg.path}: {e}") from None


def _neox_layer(cfg: _Reader) -> dict:
    theta, partial = _rope(cfg, default_partial=0.25)
    act = cfg.get("hidden_act", "gelu", str)
    if act not in ACTIVATIONS:
        raise NewLLMError(f"{cfg.path}: hidden_act {act!r} is not supported for gpt_neox (known: {sorted(ACTIVATIONS)})")
    return {"type": "pythia", **_layer_config(cfg, PythiaLayerConfig,
        hidden_size=cfg.get("hidden_size", kind=int), num_attention_heads=cfg.get("num_attention_heads", kind=int),
        intermediate_size=cfg.get("intermediate_size", kind=int), rotary_pct=partial, rotary_emb_base=theta,
        use_parallel_residual=cfg.get("use_parallel_residual", True, bool),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5, float), attention_bias=cfg.get("attention_bias", True, bool),
        hidden_act=act, initializer_range=cfg.get("initializer_range", 0.02, float),
    )}


def _llama_layer(cfg: _Reader) -> dict:
    theta, partial = _rope(cfg, default_partial=1.0)
    if partial != 1.0:
        raise NewLLMError(f"{cfg.path}: partial_rotary_factor {partial} is not supported for "
                          f"{cfg.get('model_type')} (LlamaLayer rotates the whole head)")
    act = cfg.get("hidden_act", "silu", str)
    if act != "silu":
        raise NewLLMError(f"{cfg.path}: hidden_act {act!r} is not supported for {cfg.get('model_type')} "
                          "(LlamaLayer uses SwiGLU with silu)")
    window = cfg.get("sliding_window", None) if cfg.get("model_type") == "mistral" else None
    if window is not None and cfg.get("use_sliding_window", True) is False:
        window = None
    return {"type": "llama", **_layer_config(cfg, LlamaLayerConfig,
        hidden_size=cfg.get("hidden_size", kind=int), num_attention_heads=cfg.get("num_attention_heads", kind=int),
        intermediate_size=cfg.get("intermediate_size", kind=int),
        num_key_value_heads=cfg.get("num_key_value_heads", None, int), head_dim=cfg.get("head_dim", None, int),
        rope_theta=theta, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6, float),
        attention_bias=cfg.get("attention_bias", False, bool), mlp_bias=cfg.get("mlp_bias", False, bool),
        sliding_window=window,
        initializer_range=cfg.get("initializer_range", 0.02, float),
    )}


def _layer_config(cfg: _Reader, config_class, **values) -> dict:
    """A layer config from config.json values, checked the one way (newllm.config.dataclass_from_dict)."""
    return dataclass_from_dict(config_class, values, str(cfg.path)).__dict__


#: model_type -> (layer spec builder, final norm, norm-eps key, its default, bos default, eos default)
ARCHITECTURES: dict[str, tuple] = {
    "gpt_neox": (_neox_layer, "layernorm", "layer_norm_eps", 1e-5, 0, 2),
    "llama": (_llama_layer, "rmsnorm", "rms_norm_eps", 1e-6, 1, 2),
    "mistral": (_llama_layer, "rmsnorm", "rms_norm_eps", 1e-6, 1, 2),
}


def _dtype_name(dtype, cfg: _Reader) -> str:
    """None -> float32 (CPU-friendly default); "auto" -> the dtype recorded in config.json."""
    if dtype is None:
        return "float32"
    if dtype == "auto":
        dtype = cfg.get("dtype", None) or cfg.get("torch_dtype", "float32")
    name = str(dtype).replace("torch.", "")
    if name not in MODEL_DTYPES:
        raise NewLLMError(f"{cfg.path}: dtype {name!r} is not one of {sorted(MODEL_DTYPES)}")
    return name


def hf_config(folder, dtype=None) -> ModelConfig:
    """The `ModelConfig` for a Hugging Face folder's `config.json` (module doc)."""
    return _config(_Reader(Path(folder) / "config.json"), dtype)


def _config(cfg: _Reader, dtype) -> ModelConfig:
    folder = cfg.path.parent
    model_type = cfg.get("model_type", None)
    if model_type not in ARCHITECTURES:
        raise NewLLMError(f"{cfg.path}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    build, norm, eps_key, eps_default, bos, eos = ARCHITECTURES[model_type]
    try:
        layer = build(cfg)
        n = cfg.get("num_hidden_layers", kind=int)
        if n < 1:
            raise NewLLMError(f"num_hidden_layers must be >= 1, got {n}")
        return dataclass_from_dict(ModelConfig, dict(
            vocab_size=cfg.get("vocab_size", kind=int), layers=[dict(layer) for _ in range(n)], norm=norm,
            norm_eps=cfg.get(eps_key, eps_default, float),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False, bool),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048, int),
            initializer_range=cfg.get("initializer_range", 0.02, float),
            bos_token_id=_token_id(cfg, "bos_token_id", bos), eos_token_id=_token_id(cfg, "eos_token_id", eos),
            dtype=_dtype_name(dtype, cfg), name=Path(folder).resolve().name,
        ), str(cfg.path))
    except NewLLMError as e:
        msg = str(e)
        raise NewLLMError(msg if msg.startswith(str(cfg.path)) else f"{cfg.path}: {msg}") from None


# ------------------------------------------------------------------ weight files
class _Tensors:
    """Lazy view of a folder's weights: name -> file, shape, and a reader for one tensor at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.file: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        if (folder / "model.safetensors").exists():
            self._add(folder / "model.safetensors")
        elif (folder / "model.safetensors.index.json").exists():
            self._add_index(folder / "model.safetensors.index.json")
        elif (folder / "pytorch_model.bin").exists():
            self._add(folder / "pytorch_model.bin")
        elif (folder / "pytorch_model.bin.index.json").exists():
            self._add_index(folder / "pytorch_model.bin.index.json")
        else:
            raise NewLLMError(f"{folder}: no weights (looked for model.safetensors, model.safetensors.index.json, "
                              "pytorch_model.bin, pytorch_model.bin.index.json)")

    def _add_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise NewLLMError(f"{index}: not a valid shard index (needs a 'weight_map' object; {e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise NewLLMError(f"{index}: 'weight_map' must map tensor names to shard file names")
        # every shard stays inside the folder: a name like ../x or /etc/passwd is refused, not read
        shards = {shard: contained(self.folder, shard, f"{index}: weight_map") for shard in set(weight_map.values())}
        for shard in sorted(shards):
            self._add(shards[shard])
        for name, shard in weight_map.items():
            if self.file.get(name) != shards[shard]:
                raise NewLLMError(f"{index}: tensor {name} should be in {shard}, which does not hold it")

    def _add(self, path: Path) -> None:
        if not path.is_file():
            raise NewLLMError(f"{path}: weight file is missing" if not path.exists() else f"{path}: not a regular file")
        handle = _open_safetensors(path) if path.suffix == ".safetensors" else _open_bin(path)
        self._handles[path] = handle
        for name in handle.keys():
            if name in self.file:
                raise NewLLMError(f"{path}: tensor {name} is also in {self.file[name].name}")
            self.file[name] = path

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handles[self.file[name]]
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        handle = self._handles[self.file[name]]
        if isinstance(handle, dict):
            return handle[name]
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise NewLLMError(f"{self.file[name]}: cannot read tensor {name} ({e})") from None


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise NewLLMError(f"{path}: not a readable safetensors file ({e})") from None


def _open_bin(path: Path) -> dict[str, torch.Tensor]:
    errors = (UnpicklingError, RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError)
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NewLLMError(f"{path}: not a readable PyTorch weights file ({msg})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NewLLMError(f"{path}: expected a dict of tensors (a state dict)")
    return sd


# ------------------------------------------------------------------ loading
def load_hf_model(folder, dtype=None) -> TransformerLM:
    """Build a `TransformerLM` from a Hugging Face folder (module doc); strict about every tensor.

    dtype: None -> float32; "auto" -> config.json's dtype; or a torch dtype / its name.
    """
    folder = Path(folder)
    cfg = _Reader(folder / "config.json")
    config = _config(cfg, dtype)
    model_type = cfg.d["model_type"]
    expected = expected_shapes(config, str(cfg.path))  # meta device: the model is built once the files fit
    files = _Tensors(folder)
    drop = NAMES[model_type]["drop"]

    plan: dict[str, str] = {}  # our name -> HF name
    for hf_name, path in files.file.items():
        if drop.match(hf_name):
            continue
        ours = hf_to_ours(hf_name, model_type)
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the head is the embedding, whatever the file says (as transformers)
        if ours is None or ours not in expected:
            raise NewLLMError(f"{path}: unexpected tensor {hf_name} (not part of a {config.num_hidden_layers}-layer "
                              f"{model_type} model)")
        if ours in plan:
            raise NewLLMError(f"{path}: tensors {plan[ours]} and {hf_name} both map to {ours}")
        shape, want = files.shape(hf_name), tuple(expected[ours])
        if shape != want:
            raise NewLLMError(f"{path}: tensor {hf_name} has shape {shape}, the model expects {want}")
        plan[ours] = hf_name
    needed = [k for k in expected if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    missing = [ours_to_hf(k, model_type) for k in needed if k not in plan]
    if missing:
        where = sorted({p.name for p in files.file.values()}) or [folder.name]
        raise NewLLMError(f"{folder}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                          f"(not in {', '.join(where)})")
    model = TransformerLM(config=config)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    with torch.no_grad():
        for ours, hf_name in plan.items():
            params[ours].copy_(files.read(hf_name).to(params[ours].dtype))
    return model
