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
from newllm.checkpoints.native import load_state_dict_strict
from newllm.config import MODEL_DTYPES, ModelConfig
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
    """`ModelConfig` of `LlamaLayer`s from the `llama.*` metadata."""
    arch = architecture(reader, path)

    def get(key, default=_REQUIRED):
        return field(reader, key.format(arch=arch), path, default)

    hidden = int(get(Keys.LLM.EMBEDDING_LENGTH))
    heads = int(get(Keys.Attention.HEAD_COUNT))
    head_dim = int(get(Keys.Attention.KEY_LENGTH, hidden // heads))
    if int(get(Keys.Attention.VALUE_LENGTH, head_dim)) != head_dim:
        raise NewLLMError(f"{path}: key_length {head_dim} != value_length; LlamaLayer needs them equal")
    rope_dims = int(get(Keys.Rope.DIMENSION_COUNT, head_dim))
    if rope_dims != head_dim:
        raise NewLLMError(f"{path}: rope.dimension_count {rope_dims} != head size {head_dim}; partial RoPE "
                          "is not supported for llama")
    scaling = get(Keys.Rope.SCALING_TYPE, "none")
    if scaling not in ("none", None):
        raise NewLLMError(f"{path}: rope scaling {scaling!r} is not supported")
    layer = LlamaLayerConfig(
        hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim,
        intermediate_size=int(get(Keys.LLM.FEED_FORWARD_LENGTH)),
        num_key_value_heads=int(get(Keys.Attention.HEAD_COUNT_KV, heads)),
        rope_theta=float(get(Keys.Rope.FREQ_BASE, 10000.0)),
        rms_norm_eps=float(get(Keys.Attention.LAYERNORM_RMS_EPS)),
    )
    vocab = get(Keys.LLM.VOCAB_SIZE, None)
    if vocab is None:  # older files: the vocabulary size is the token list's length, else the embedding's rows
        tokens = reader.get_field(Keys.Tokenizer.LIST)
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens.data) if tokens is not None else (int(embd.shape[-1]) if embd is not None else None)
        if vocab is None:
            raise NewLLMError(f"{path}: cannot tell the vocabulary size (no vocab_size, tokens or token_embd.weight)")
    if dtype is not None:
        dtype = str(dtype).replace("torch.", "")
        if dtype not in MODEL_DTYPES:
            raise NewLLMError(f"{path}: dtype {dtype!r} is not one of {sorted(MODEL_DTYPES)}")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig(
        vocab_size=int(vocab),
        layers=[{"type": "llama", **dataclasses.asdict(layer)} for _ in range(int(get(Keys.LLM.BLOCK_COUNT)))],
        norm="rmsnorm", norm_eps=layer.rms_norm_eps, tie_word_embeddings=tied,
        max_position_embeddings=get(Keys.LLM.CONTEXT_LENGTH, None),
        bos_token_id=field(reader, Keys.Tokenizer.BOS_ID, path, None),
        eos_token_id=field(reader, Keys.Tokenizer.EOS_ID, path, None),
        dtype=dtype or "float32",
        name=field(reader, Keys.General.NAME, path, Path(path).stem),
    )


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
    model = TransformerLM(config=config)
    expected = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = our_name(t.name)
        if name not in expected:
            raise NewLLMError(f"{path}: unexpected tensor {t.name} (not part of a {config.num_hidden_layers}-layer "
                              "llama model)")
        w = read_tensor(t, path)
        if tuple(w.shape) != tuple(expected[name].shape):
            raise NewLLMError(f"{path}: tensor {t.name} has shape {tuple(w.shape)}, the model expects "
                              f"{tuple(expected[name].shape)}")
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
