"""GGUF files (llama.cpp's format): Llama-architecture models.

    model = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")   # -> TransformerLM of LlamaLayers

The tokenizer embedded in the file is rebuilt by `newllm.checkpoints.gguf_tokenizer`.

Parsing is the `gguf` package's `GGUFReader`; dequantization is ours (`gguf_dequant.py`, equal to
`gguf.quants.dequantize` bit for bit). Weights are dequantized to float32 and then cast to the
model dtype, so a quantized file gives exactly the weights llama.cpp's reference dequantizer gives.

Conventions that differ between llama.cpp and us (and Hugging Face):

* Shapes: GGUF lists dimensions innermost first (`ne0` = input features), so a tensor listed as
  [in, out] is our (out, in) `nn.Linear` weight once the order is reversed.
* Q/K permutation: llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders
  the rows of `attn_q` / `attn_k` inside each head from the rotate-half layout (first half, second
  half) to interleaved pairs (x0, x_{D/2}, x1, x_{D/2+1}, ...), because its RoPE rotates adjacent
  pairs. Our RoPE rotates halves, so we undo it: per head, view the Dh rows as (Dh/2, 2) and
  transpose to (2, Dh/2). K uses the number of KV heads.
* Tied head: a file without `output.weight` uses the token embedding as LM head.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, Keys

from newllm.checkpoints.gguf_dequant import SUPPORTED, dequantize
from newllm.checkpoints.native import expected_shapes, load_state_dict_strict
from newllm.config import MODEL_DTYPES, ModelConfig, check_value, dataclass_from_dict
from newllm.errors import NewLLMError
from newllm.models.layers.llama import LlamaLayerConfig
from newllm.models.model import TransformerLM

ARCHITECTURES = ("llama",)

#: GGUF tensor name -> ours. Per-layer names are `blk.{i}.{part}.{weight|bias}` -> `layers.{i}.{part}...`
TOP_LEVEL = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_REQUIRED = object()
_reader_cache: dict[tuple, GGUFReader] = {}


# ------------------------------------------------------------------ reading the file
def open_gguf(path) -> GGUFReader:
    """A `GGUFReader` for `path`; any failure to parse becomes a one-line `NewLLMError`.

    Parsing the header of a file with a 50k-token vocabulary takes seconds, so the last reader is
    kept (keyed by path, size and mtime) for the model + tokenizer pair that is usually loaded.
    """
    p = Path(path)
    if not p.is_file():
        raise NewLLMError(f"{p}: no such GGUF file")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _reader_cache:
        return _reader_cache[key]
    with p.open("rb") as f:
        magic = f.read(4)
    if len(magic) < 4:
        raise NewLLMError(f"{p}: too short to be a GGUF file ({len(magic)} bytes)")
    if magic != b"GGUF":
        raise NewLLMError(f"{p}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(p, "r")
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/OSError on damaged files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NewLLMError(f"{p}: damaged or truncated GGUF file ({st.st_size:,} bytes; the reader says: {msg})") from None
    _reader_cache.clear()
    _reader_cache[key] = reader
    return reader


def field(reader: GGUFReader, key: str, path, default: Any = _REQUIRED) -> Any:
    """The value of metadata `key` (str, number, bool or list), or `default` when absent."""
    f = reader.get_field(key)
    if f is None:
        if default is _REQUIRED:
            raise NewLLMError(f"{path}: GGUF metadata has no {key!r}")
        return default
    try:
        return f.contents()
    except Exception as e:
        raise NewLLMError(f"{path}: cannot read GGUF metadata {key!r} ({e})") from None


def architecture(reader: GGUFReader, path) -> str:
    arch = field(reader, Keys.General.ARCHITECTURE, path)
    if arch not in ARCHITECTURES:
        raise NewLLMError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


# ------------------------------------------------------------------ config
def gguf_config(reader: GGUFReader, path, dtype=None) -> ModelConfig:
    """`ModelConfig` of `LlamaLayer`s from the `llama.*` metadata.

    Every value is type-checked (a size must be a positive integer, a float a finite number) and the
    declared layer count and vocabulary are checked against the tensors the file lists, before any
    model is built: a small file that claims 20,000 layers fails here, not after allocating them."""
    arch = architecture(reader, path)

    def get(key, hint, default=_REQUIRED):
        key = key.format(arch=arch)
        value = field(reader, key, path, default)
        if value is None:
            return None
        try:
            return check_value(value, hint, f"GGUF metadata {key!r}")
        except NewLLMError as e:
            raise NewLLMError(f"{path}: {e}") from None

    hidden = get(Keys.LLM.EMBEDDING_LENGTH, int)
    heads = get(Keys.Attention.HEAD_COUNT, int)
    for key, value in ((Keys.LLM.EMBEDDING_LENGTH, hidden), (Keys.Attention.HEAD_COUNT, heads)):
        if value <= 0:
            raise NewLLMError(f"{path}: GGUF metadata {key.format(arch=arch)!r} must be > 0, got {value}")
    head_dim = get(Keys.Attention.KEY_LENGTH, int, None)
    if head_dim is None:
        if hidden % heads:
            raise NewLLMError(f"{path}: {heads} attention heads do not divide the embedding length {hidden} "
                              "(and the file gives no key_length)")
        head_dim = hidden // heads
    if get(Keys.Attention.VALUE_LENGTH, int, head_dim) != head_dim:
        raise NewLLMError(f"{path}: key_length {head_dim} != value_length; LlamaLayer needs them equal")
    rope_dims = get(Keys.Rope.DIMENSION_COUNT, int, head_dim)
    if rope_dims != head_dim:
        raise NewLLMError(f"{path}: rope.dimension_count {rope_dims} != head size {head_dim}; partial RoPE "
                          "is not supported for llama")
    scaling = get(Keys.Rope.SCALING_TYPE, str, "none")
    if scaling not in ("none", None):
        raise NewLLMError(f"{path}: rope scaling {scaling!r} is not supported")
    layer = dataclass_from_dict(LlamaLayerConfig, dict(
        hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim,
        intermediate_size=get(Keys.LLM.FEED_FORWARD_LENGTH, int),
        num_key_value_heads=get(Keys.Attention.HEAD_COUNT_KV, int, heads),
        rope_theta=get(Keys.Rope.FREQ_BASE, float, 10000.0),
        rms_norm_eps=get(Keys.Attention.LAYERNORM_RMS_EPS, float),
    ), str(path))
    names = {t.name for t in reader.tensors}
    blocks = get(Keys.LLM.BLOCK_COUNT, int)
    held = {int(n.split(".")[1]) for n in names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    # distinct indices: exactly 0 .. blocks-1 when there are `blocks` of them from 0 to blocks-1 (no range built)
    if blocks <= 0 or len(held) != blocks or min(held) != 0 or max(held) != blocks - 1:
        raise NewLLMError(f"{path}: the header declares {blocks} layers, the file holds tensors for "
                          f"{len(held)} (blk.0 .. blk.{max(held, default=-1)})")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = get(Keys.LLM.VOCAB_SIZE, int, None)
    if vocab is None:  # older files: the vocabulary size is the token list's length, else the embedding's rows
        tokens = reader.get_field(Keys.Tokenizer.LIST)
        vocab = len(tokens.data) if tokens is not None else (int(embd.shape[-1]) if embd is not None else None)
        if vocab is None:
            raise NewLLMError(f"{path}: cannot tell the vocabulary size (no vocab_size, tokens or token_embd.weight)")
    if embd is not None and int(embd.shape[-1]) != vocab:
        raise NewLLMError(f"{path}: the header declares a vocabulary of {vocab}, token_embd.weight holds "
                          f"{int(embd.shape[-1])} rows")
    if dtype is not None:
        dtype = str(dtype).replace("torch.", "")
        if dtype not in MODEL_DTYPES:
            raise NewLLMError(f"{path}: dtype {dtype!r} is not one of {sorted(MODEL_DTYPES)}")
    tied = "output.weight" not in names
    return dataclass_from_dict(ModelConfig, dict(
        vocab_size=vocab,
        layers=[{"type": "llama", **dataclasses.asdict(layer)} for _ in range(blocks)],
        norm="rmsnorm", norm_eps=layer.rms_norm_eps, tie_word_embeddings=tied,
        max_position_embeddings=get(Keys.LLM.CONTEXT_LENGTH, int, None),
        bos_token_id=get(Keys.Tokenizer.BOS_ID, int, None),
        eos_token_id=get(Keys.Tokenizer.EOS_ID, int, None),
        dtype=dtype or "float32",
        name=str(field(reader, Keys.General.NAME, path, Path(path).stem)),
    ), str(path))


# ------------------------------------------------------------------ tensors
def our_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight`; an unknown name is returned unchanged."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK:
        return f"layers.{parts[1]}.{BLOCK[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_LEVEL:
        return f"{TOP_LEVEL[parts[0]]}.{parts[1]}"
    return gguf_name


def gguf_name(name: str) -> str:
    """Inverse of `our_name`, for error messages."""
    parts = name.split(".")
    inverse_block = {v: k for k, v in BLOCK.items()}
    inverse_top = {v: k for k, v in TOP_LEVEL.items()}
    module = ".".join(parts[2:-1])  # layers.{i}.{module}.{weight|bias}
    if len(parts) >= 4 and parts[0] == "layers" and module in inverse_block:
        return f"blk.{parts[1]}.{inverse_block[module]}.{parts[-1]}"
    if len(parts) == 2 and parts[0] in inverse_top:
        return f"{inverse_top[parts[0]]}.{parts[1]}"
    return name


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (module doc). w: (n_heads * Dh, ...) -> same shape."""
    rest = w.shape[1:]
    return w.reshape(n_heads, -1, 2, *rest).transpose(1, 2).reshape(w.shape)


def read_tensor(t, path) -> torch.Tensor:
    """Dequantize one reader tensor to float32 in our (numpy / PyTorch) dimension order."""
    qtype = GGMLQuantizationType(int(t.tensor_type))
    try:
        flat = dequantize(t.data, qtype)
    except KeyError:
        raise NewLLMError(f"{path}: tensor {t.name} has type {qtype.name}, which newllm cannot dequantize "
                          f"(supported: {', '.join(SUPPORTED)})") from None
    except ValueError as e:
        raise NewLLMError(f"{path}: tensor {t.name}: {e}") from None
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne0 (innermost) first
    if flat.numel() != int(np.prod(shape)):
        raise NewLLMError(f"{path}: tensor {t.name} holds {flat.numel()} values, its shape {shape} needs "
                          f"{int(np.prod(shape))}")
    return flat.reshape(shape)


def load_gguf_model(path, dtype=None) -> TransformerLM:
    """Build a `TransformerLM` of `LlamaLayer`s from a Llama-architecture GGUF file.

    Every tensor of the file must be used and every model weight must come from the file (strict);
    a failure names the tensor (GGUF name) and the file.
    """
    reader = open_gguf(path)
    config = gguf_config(reader, path, dtype)
    layer = config.layers[0]
    # names and declared shapes against the config (a meta-device model: nothing allocated) first
    expected = expected_shapes(config, str(path))
    for t in reader.tensors:
        name = our_name(t.name)
        if name not in expected:
            raise NewLLMError(f"{path}: unexpected tensor {t.name} (not part of a {config.num_hidden_layers}-layer "
                              "llama model)")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if shape != expected[name]:
            raise NewLLMError(f"{path}: tensor {t.name} has shape {shape}, the model expects {expected[name]}")
    listed = {our_name(t.name) for t in reader.tensors}
    missing = [gguf_name(k) for k in expected if k not in listed and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise NewLLMError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model = TransformerLM(config=config)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = our_name(t.name)
        w = read_tensor(t, path)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, layer["num_attention_heads"])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, layer["num_key_value_heads"])
        tensors[name] = w
    if config.tie_word_embeddings and "embed.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    missing = [gguf_name(k) for k in expected if k not in tensors]
    if missing:
        raise NewLLMError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    load_state_dict_strict(model, tensors, str(path))
    return model
