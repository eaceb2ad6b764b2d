"""Our own model format: a folder with `model.safetensors` and `newllm.json` (format + config).

safetensors holds only tensors (no pickle), so a model folder from elsewhere cannot run code.
A tied LM head is stored once (as the embedding) and re-tied on load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from newllm.config import ModelConfig
from newllm.errors import NewLLMError
from newllm.models.context import build_model
from newllm.models.model import TransformerLM

FORMAT = "newllm-model"
VERSION = 1


def save_model(model: TransformerLM, folder, metadata: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    save_file(tensors, str(folder / "model.safetensors"))
    header = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "metadata": metadata or {}}
    (folder / "newllm.json").write_text(json.dumps(header, indent=2))
    return folder


def load_model(folder, dtype=None) -> TransformerLM:
    folder = Path(folder)
    try:
        header = json.loads((folder / "newllm.json").read_text())
    except json.JSONDecodeError as e:
        raise NewLLMError(f"{folder / 'newllm.json'}: not valid JSON ({e})") from None
    if header.get("format") != FORMAT:
        raise NewLLMError(f"{folder / 'newllm.json'}: format is {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != VERSION:
        raise NewLLMError(f"{folder / 'newllm.json'}: version {header.get('version')} is not supported (expected {VERSION})")
    fields = dict(header["config"])
    if dtype is not None:
        fields["dtype"] = str(dtype).replace("torch.", "")
    config = ModelConfig.from_dict(fields, where=str(folder / "newllm.json"))
    model = build_model(config)  # a ContextLM when the config has context_feedback
    try:
        tensors = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise NewLLMError(f"{folder / 'model.safetensors'}: cannot read ({e})") from None
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors.get("embed.weight")
    load_state_dict_strict(model, tensors, str(folder / "model.safetensors"))
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
