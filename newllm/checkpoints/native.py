"""Our own model format: a folder with `model.safetensors` and `newllm.json` (format + config).

safetensors holds only tensors (no pickle), so a model folder from elsewhere cannot run code.
A tied LM head is stored once (as the embedding) and re-tied on load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from newllm.config import ModelConfig
from newllm.errors import NewLLMError
from newllm.files import atomic_write, dumps_json, write_text
from newllm.models.context import build_model
from newllm.models.layers.base import model_config_from_dict
from newllm.models.model import TransformerLM

FORMAT = "newllm-model"
VERSION = 1


def save_model(model: TransformerLM, folder, metadata: dict | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `folder/model.safetensors` and `folder/newllm.json`, each atomically (newllm.files).
    `state_dict`: the weights to write instead of `model.state_dict()` (the full weights gathered from
    a model sharded across processes, newllm.train.distributed.full_state_dict)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NewLLMError(f"{folder}: exists and is not a folder; not writing a model there")
    folder.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous() for k, v in weights.items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    header = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "metadata": metadata or {}}
    write_text(folder / "newllm.json", dumps_json(header))
    return folder


def read_header(folder: Path) -> dict:
    """`folder/newllm.json` checked: a JSON object of our format and version with a `config` mapping."""
    f = folder / "newllm.json"
    try:
        header = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NewLLMError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise NewLLMError(f"{f}: expected a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        raise NewLLMError(f"{f}: format is {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != VERSION:
        raise NewLLMError(f"{f}: version {header.get('version')!r} is not supported (expected {VERSION})")
    if not isinstance(header.get("config"), dict):
        raise NewLLMError(f"{f}: 'config' must be an object, got {type(header.get('config')).__name__}")
    return header


def expected_shapes(config: ModelConfig, where: str = "model config") -> dict[str, tuple[int, ...]]:
    """Every weight's shape for `config`, from a model built on the meta device (nothing allocated):
    what a file's declared shapes are checked against before the real model is built. Sizes so large
    that even their shapes overflow (a header declaring 1.5e9 x 1.5e9 weights) are a `NewLLMError`."""
    try:
        with torch.device("meta"):
            model = build_model(config)
    except (RuntimeError, OverflowError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise NewLLMError(f"{where}: the declared sizes cannot be built ({first})") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_declared(expected: dict[str, tuple[int, ...]], declared: dict[str, tuple[int, ...]], where: str,
                   tied: bool) -> None:
    """Names and shapes a file declares against `expected_shapes`, before anything is allocated."""
    want = {k: v for k, v in expected.items() if not (tied and k == "lm_head.weight")}
    got = {k: v for k, v in declared.items() if not (tied and k == "lm_head.weight")}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        raise NewLLMError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                          f"(the header declares a model the file does not hold)")
    if extra:
        raise NewLLMError(f"{where}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k, shape in want.items():
        if tuple(got[k]) != tuple(shape):
            raise NewLLMError(f"{where}: tensor {k} has shape {tuple(got[k])}, the header's config needs {tuple(shape)}")


def load_model(folder, dtype=None) -> TransformerLM:
    folder = Path(folder)
    header = read_header(folder)
    fields = dict(header["config"])
    if dtype is not None:
        fields["dtype"] = str(dtype).replace("torch.", "")
    config = model_config_from_dict(fields, where=str(folder / "newllm.json"), require=True)
    weights = folder / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            declared = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise NewLLMError(f"{weights}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    check_declared(expected_shapes(config, str(folder / "newllm.json")), declared, str(weights),
                   config.tie_word_embeddings)
    model = build_model(config)  # a ContextLM when the config has context_feedback
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise NewLLMError(f"{weights}: cannot read ({e})") from None
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors.get("embed.weight")
    load_state_dict_strict(model, tensors, str(weights))
    return model


def load_state_dict_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy `tensors` into `model`, failing with a one-line message on any missing/extra/mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in tensors or tensors[k] is None)
    extra = sorted(k for k in tensors if k not in expected)
    if missing:
        raise NewLLMError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise NewLLMError(f"{where}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise NewLLMError(f"{where}: tensor {k} has shape {tuple(tensors[k].shape)}, model expects {tuple(v.shape)}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k].to(v.dtype))
