"""Loading models from files: our own format, Hugging Face folders (GPT-NeoX, Llama), GGUF.

`load_pretrained(path)` picks the adapter from what is at `path`:

* a `.gguf` file -> `newllm.checkpoints.gguf`
* a folder with `newllm.json` (our format, written by `save_model`) -> `newllm.checkpoints.native`
* a folder with `config.json` (Hugging Face) -> `newllm.checkpoints.hf`
* a preset or layer-type name (`"pythia"`, ...) -> a freshly initialised `create_model(name)`

`load_tokenizer(path)` does the same for tokenizers: a `.gguf` file -> its embedded vocabulary
(`newllm.checkpoints.gguf_tokenizer`); a `tokenizer.json` file or a folder holding one ->
`newllm.data.tokenizer.from_tokenizer_json`.
"""
from __future__ import annotations

from pathlib import Path

from newllm.errors import NewLLMError


def load_pretrained(path, dtype=None, **kwargs):
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from newllm.checkpoints.gguf import load_gguf_model

        return load_gguf_model(p, dtype=dtype, **kwargs)
    if p.is_dir() and (p / "newllm.json").exists():
        from newllm.checkpoints.native import load_model

        return load_model(p, dtype=dtype)
    if p.is_dir() and (p / "config.json").exists():
        from newllm.checkpoints.hf import load_hf_model

        return load_hf_model(p, dtype=dtype, **kwargs)
    if not p.exists():
        from newllm.models.presets import create_model, model_names

        if str(path) in model_names():
            return create_model(str(path), **kwargs)
        raise NewLLMError(f"{path}: no such file or directory, and not a preset or layer type ({model_names()})")
    if p.is_file():
        raise NewLLMError(f"{path}: not a .gguf file; give a .gguf file or a model folder")
    raise NewLLMError(f"{path}: folder has neither newllm.json (newllm checkpoint) nor config.json (Hugging Face)")


def load_tokenizer(path):
    """A `newllm.data.tokenizer.Tokenizer` from a .gguf file, a tokenizer.json file or a folder holding one."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from newllm.checkpoints.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(p)
    from newllm.data.tokenizer import from_tokenizer_json

    return from_tokenizer_json(p)
