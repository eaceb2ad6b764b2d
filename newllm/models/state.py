"""Memory-state containers: what a model has absorbed, self-describing, validated, saved with safetensors.

A model's raw state is a tuple with one entry per layer (a NamedTuple of tensors, or None), plus
any model-level entries after them (e.g. ContextLM's feedback). `ModelMemoryState` wraps that tuple
with everything needed to check it against a model on another machine::

    state = model.get_memory_state()            # ModelMemoryState (None if nothing is held)
    newllm.save_memory_state(state, "mem.safetensors")
    state = newllm.load_memory_state("mem.safetensors")   # e.g. in another process / machine
    model.set_memory_state(state)               # validated: fingerprint, layer types, shapes

File format (`FORMAT_NAME`, version `FORMAT_VERSION`): a safetensors file whose tensors are named
`"{entry}.{field}"` (e.g. `"0.memory"`, `"3.k"`) and whose metadata holds one key, `"newllm"`, a
JSON header::

    {"format": "newllm.memory_state", "version": 2, "fingerprint": <model.config.fingerprint()>,
     "weights": <weights_fingerprint(model)>, "compact": bool, "tokens_absorbed": int | null,
     "entries": [{"index": i, "layer_type": "infini" | "pythia" | ... | "model",
                  "state_type": "InfiniState" | "KVCache" | null, "fields": [...],
                  "compressive": bool, "tokens": int | null,
                  "tensors": {field: {"shape": [...], "dtype": "float32"}}}, ...],
     "sha256": hex digest of the header without this key, then every tensor's name, dtype,
               shape and bytes in entry/field order}

The fingerprints: `fingerprint` covers the config (layer types, sizes, rules), `weights` a sha256
of every weight, so a state taken with one model is refused by another model of the same config
whose weights differ (a memory means something only to the weights that wrote it); accepting such
a state anyway is explicit: `set_memory_state(state, allow_weight_mismatch=True)`, `newllm memory
check --allow-weight-mismatch`. A `torch.save`d file (the seeds' `memory.pt`) is recognised and
refused by name: it is pickle, which newllm never loads from a foreign file.

The digest makes a tampered or truncated file fail loudly (`NewLLMError`, one line) instead of
loading wrong numbers. It is an integrity check, not a signature: anyone can recompute it. No
pickle anywhere: a state file from another machine cannot run code.

Compact states (`compact=True`) keep only the entries of layers with `has_compressive_memory`
(and model-level entries); the softmax-attention layers' KV caches become None. Continuing from a
compact state means: the compressive layers continue exactly where they were (memory, counters and
the incomplete segment), while every attention layer starts with an EMPTY cache, so it sees only
the new tokens, with positions counted again from 0. The logits are those of running the new
tokens with those caches empty, not those of the full state: the past reaches the attention layers
only through the memory layers below them. That is the seeds' "carry the memory to another
machine" use; its size does not grow with the tokens absorbed.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from newllm.config import DTYPE_NAMES
from newllm.errors import NewLLMError
from newllm.files import atomic_write
from newllm.models.layers.base import check_state_fields

FORMAT_NAME = "newllm.memory_state"
FORMAT_VERSION = 2  # 2: the weights fingerprint
METADATA_KEY = "newllm"
MODEL_ENTRY = "model"  # layer_type of entries after the layers (model-level state)


@dataclass
class EntryState:
    """One entry of a model's state: a layer's NamedTuple (or None) with its description."""

    index: int
    layer_type: str  # registry name of the layer, or MODEL_ENTRY for a model-level entry
    state_type: str | None  # NamedTuple class name; None when the entry is empty
    fields: tuple[str, ...] = ()
    tensors: tuple[torch.Tensor, ...] | None = None  # in `fields` order; None when empty
    compressive: bool = False  # the layer's has_compressive_memory
    tokens: int | None = None  # tokens this entry has absorbed, where the layer can tell

    def size_bytes(self) -> int:
        return 0 if self.tensors is None else sum(t.numel() * t.element_size() for t in self.tensors)

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "layer_type": self.layer_type, "state_type": self.state_type,
                "fields": list(self.fields), "compressive": self.compressive, "tokens": self.tokens,
                "tensors": {} if self.tensors is None else
                {f: {"shape": list(t.shape), "dtype": DTYPE_NAMES.get(t.dtype, str(t.dtype))}
                 for f, t in zip(self.fields, self.tensors)}}


@dataclass
class ModelMemoryState:
    """A model's memory, versioned and self-describing (see the module docstring)."""

    fingerprint: str  # model.config.fingerprint() of the model it was taken from
    entries: list[EntryState]
    weights: str | None = None  # weights_fingerprint() of that model (None: not recorded)
    compact: bool = False
    tokens_absorbed: int | None = None  # the most any entry has absorbed (None: no layer can tell)
    version: int = FORMAT_VERSION
    format: str = field(default=FORMAT_NAME)

    @property
    def layer_types(self) -> list[str]:
        return [e.layer_type for e in self.entries]

    @property
    def batch_size(self) -> int | None:
        for e in self.entries:
            for t in e.tensors or ():
                if t.dim() >= 1:
                    return t.shape[0]
        return None

    def size_bytes(self) -> list[int]:
        """Bytes held by each entry's tensors (0 for an empty entry)."""
        return [e.size_bytes() for e in self.entries]

    def header(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "fingerprint": self.fingerprint,
                "weights": self.weights, "compact": self.compact, "tokens_absorbed": self.tokens_absorbed,
                "entries": [e.describe() for e in self.entries]}

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{e.index}.{f}": t for e in self.entries if e.tensors is not None
                for f, t in zip(e.fields, e.tensors)}


# ---------------------------------------------------------------------------- from / to a model
# Everything below reads only what layers declare (BaseLayer: state_type, state_spec,
# tokens_absorbed, has_compressive_memory) and what the model declares (extra_state_types).
_weights_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_fingerprint(model) -> str:
    """Short sha256 of every weight and buffer (name, dtype, shape, bytes) of `model`. Kept per model
    until a parameter is changed or replaced (torch's in-place version counters), so asking again
    for an unchanged model costs nothing."""
    tensors = model.state_dict(keep_vars=True)
    key = tuple((k, t.data_ptr(), t._version) for k, t in tensors.items())
    hit = _weights_cache.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{DTYPE_NAMES.get(t.dtype, str(t.dtype))}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest_ = h.hexdigest()[:16]
    _weights_cache[model] = (key, digest_)
    return digest_


def entry_tokens(layer, state) -> int | None:
    """Tokens a layer's state has absorbed, as the layer tells (None for model-level entries)."""
    if state is None or layer is None:
        return None
    tokens = layer.tokens_absorbed(state)
    return None if tokens is None else int(tokens)


def snapshot(model, raw: tuple, compact: bool = False) -> ModelMemoryState:
    """Wrap a model's raw state tuple (detached) in a `ModelMemoryState`."""
    layers = list(model.layers)
    entries, known = [], []
    for i, s in enumerate(raw):
        layer = layers[i] if i < len(layers) else None
        compressive = layer is not None and layer.has_compressive_memory
        layer_type = layer.layer_type if layer is not None else MODEL_ENTRY
        tokens = entry_tokens(layer, s)
        if tokens is not None:  # counted before compaction: the model absorbed them either way
            known.append(tokens)
        if s is None or (compact and layer is not None and not compressive):
            entries.append(EntryState(i, layer_type, None, compressive=compressive))
            continue
        if not isinstance(s, tuple) or not hasattr(type(s), "_fields"):
            raise NewLLMError(f"state entry {i} ({layer_type}) is a {type(s).__name__}, expected a NamedTuple "
                              "of tensors")
        entries.append(EntryState(i, layer_type, type(s).__name__, tuple(s._fields),
                                  tuple(t.detach() for t in s), compressive, tokens))
    return ModelMemoryState(model.config.fingerprint(), entries, weights_fingerprint(model), compact,
                            max(known) if known else None)


def entry_type(model, index: int):
    """The state NamedTuple class of entry `index`: the layer's, or the model's extra entry's."""
    layers = list(model.layers)
    if index < len(layers):
        return layers[index].state_type
    extra = model.extra_state_types
    return extra[index - len(layers)] if index - len(layers) < len(extra) else None


def check_entry(model, layer, e: EntryState) -> None:
    """Raise NewLLMError naming the first way `e` does not fit `layer` (type, fields, rank, shape)."""
    where = f"memory state layer {e.index}"
    if e.layer_type != layer.layer_type:
        raise NewLLMError(f"{where}: state is for a {e.layer_type!r} layer, the model has {layer.layer_type!r}")
    if e.tensors is None:
        return
    cls = layer.state_type
    if cls is None:
        raise NewLLMError(f"{where} ({e.layer_type}): the layer keeps no state, the file has {e.state_type}")
    if cls.__name__ != e.state_type or tuple(cls._fields) != e.fields:
        raise NewLLMError(f"{where} ({e.layer_type}): state is {e.state_type}{list(e.fields)}, the layer makes "
                          f"{cls.__name__}{list(cls._fields)}")
    check_state_fields(f"{where} ({e.layer_type})", layer.state_spec(), cls(*e.tensors))


def unpack(model, state: ModelMemoryState, allow_weight_mismatch: bool = False) -> tuple:
    """Validate `state` against `model` and return the raw per-entry tuple, on the model's device
    and in its dtypes (floating tensors are cast to the dtype the layer declares, or the model's).
    A state taken with other weights (same config) is refused unless `allow_weight_mismatch`."""
    if not isinstance(state, ModelMemoryState):
        raise NewLLMError(f"expected a ModelMemoryState, got {type(state).__name__}")
    if state.format != FORMAT_NAME or state.version != FORMAT_VERSION:
        raise NewLLMError(f"memory state format {state.format!r} version {state.version} is not supported "
                          f"(this is {FORMAT_NAME!r} version {FORMAT_VERSION})")
    layers = list(model.layers)
    n_layers = sum(1 for e in state.entries if e.layer_type != MODEL_ENTRY)
    if n_layers != len(layers):
        raise NewLLMError(f"memory state has {n_layers} layer entries, the model has {len(layers)} layers")
    for e, layer in zip(state.entries, layers):
        if e.layer_type != layer.layer_type:
            raise NewLLMError(f"memory state layer {e.index}: state is for a {e.layer_type!r} layer, the model "
                              f"has {layer.layer_type!r}")
    for e, layer in zip(state.entries, layers):
        check_entry(model, layer, e)
    want = model.config.fingerprint()
    if state.fingerprint != want:
        raise NewLLMError(f"memory state fingerprint {state.fingerprint} does not match the model's {want} "
                          "(same layer types and shapes, but a different config: segment length, rule, ...)")
    have = weights_fingerprint(model)
    if state.weights != have and not allow_weight_mismatch:
        raise NewLLMError(f"memory state was taken with other weights (weights fingerprint {state.weights}, this "
                          f"model's {have}): same config, but the memory means something only to the model that "
                          "wrote it; pass allow_weight_mismatch=True (--allow-weight-mismatch) to use it anyway")
    p = next(model.parameters())
    raw = []
    for i, e in enumerate(state.entries):
        if e.tensors is None:
            raw.append(None)
            continue
        cls = entry_type(model, i)
        if cls is None or cls.__name__ != e.state_type or tuple(cls._fields) != e.fields:
            raise NewLLMError(f"memory state entry {i}: {e.state_type}{list(e.fields)} is not a state this model "
                              "makes")
        spec = layers[i].state_spec() if i < len(layers) else {}
        tensors = []
        for f, t in zip(e.fields, e.tensors):
            declared = spec[f].dtype if f in spec else None
            dtype = (declared or p.dtype) if t.dtype.is_floating_point else t.dtype
            tensors.append(t.to(device=p.device, dtype=dtype))
        raw.append(cls(*tensors))
    return tuple(raw)


# ---------------------------------------------------------------------------- files
def digest(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the header (without "sha256") and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{DTYPE_NAMES.get(t.dtype, str(t.dtype))}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_memory_state(state: ModelMemoryState, path: str | Path) -> None:
    """Write `state` to a safetensors file (JSON header in its metadata, see the module docstring)."""
    from safetensors.torch import save_file

    if not isinstance(state, ModelMemoryState):
        raise NewLLMError(f"save_memory_state: expected a ModelMemoryState (model.get_memory_state()), got "
                          f"{type(state).__name__}")
    # clone: safetensors refuses views and tensors sharing storage (a broadcast batch-1 state is both)
    tensors = {k: t.detach().cpu().contiguous().clone() for k, t in state.named_tensors().items()}
    header = state.header()
    header["sha256"] = digest(header, tensors)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header)}))


def load_memory_state(path: str | Path) -> ModelMemoryState:
    """Read a state written by `save_memory_state`; a corrupt, truncated or tampered file raises
    `NewLLMError` naming the file and the problem."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise NewLLMError(f"{path}: memory state file not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:4] == b"PK\x03\x04" or (len(magic) >= 2 and magic[0] == 0x80 and 2 <= magic[1] <= 5):
        raise NewLLMError(f"{path}: a PyTorch pickle file (torch.save, like the seeds' memory.pt), not a newllm memory "
                          "state; newllm never unpickles a foreign file: make the state with newllm "
                          "(model.get_memory_state() + newllm.save_memory_state, or `newllm memory save`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise NewLLMError(f"{path}: not a readable safetensors file (truncated or corrupt): "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if METADATA_KEY not in meta:
        raise NewLLMError(f"{path}: safetensors file without a newllm memory-state header")
    try:
        header = json.loads(meta[METADATA_KEY])
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError as err:
        raise NewLLMError(f"{path}: memory-state header is not valid JSON ({err})") from None
    if header.get("format") != FORMAT_NAME:
        raise NewLLMError(f"{path}: not a newllm memory state (format {header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise NewLLMError(f"{path}: memory-state version {header.get('version')} is not supported "
                          f"(this newllm reads version {FORMAT_VERSION})")
    try:
        entries_h = header["entries"]
        names = [f"{e['index']}.{f}" for e in entries_h for f in e["fields"] if e["tensors"]]
    except (KeyError, TypeError) as err:
        raise NewLLMError(f"{path}: memory-state header is missing {err}") from None
    if sorted(names) != sorted(tensors):
        raise NewLLMError(f"{path}: tensors {sorted(tensors)} do not match the header's {sorted(names)}")
    ordered = {n: tensors[n] for n in names}
    if header.get("sha256") != digest(header, ordered):
        raise NewLLMError(f"{path}: sha256 check failed: the file was modified or damaged after it was saved")
    try:
        entries = [load_entry(e, ordered, path) for e in entries_h]
        return ModelMemoryState(header["fingerprint"], entries, header["weights"], header["compact"],
                                header["tokens_absorbed"], header["version"], header["format"])
    except (KeyError, TypeError) as err:
        raise NewLLMError(f"{path}: memory-state header is malformed (missing or wrong {err})") from None


def load_entry(e: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> EntryState:
    ts = None
    if e["tensors"]:
        ts = tuple(tensors[f"{e['index']}.{f}"] for f in e["fields"])
        for f, t in zip(e["fields"], ts):
            d = e["tensors"][f]
            if list(t.shape) != d["shape"] or DTYPE_NAMES.get(t.dtype) != d["dtype"]:
                raise NewLLMError(f"{path}: tensor {e['index']}.{f} is {list(t.shape)} {t.dtype}, the header "
                                  f"says {d['shape']} {d['dtype']}")
    return EntryState(e["index"], e["layer_type"], e["state_type"], tuple(e["fields"]), ts, e["compressive"],
                      e["tokens"])


def format_state(state: ModelMemoryState) -> str:
    """A human-readable table of a state (the `newllm memory info` output)."""
    lines = [f"format {state.format} v{state.version}, fingerprint {state.fingerprint}, "
             f"{'compact, ' if state.compact else ''}batch {state.batch_size}, tokens absorbed "
             f"{state.tokens_absorbed}, {sum(state.size_bytes()):,} bytes"]
    for e in state.entries:
        shapes = "empty" if e.tensors is None else ", ".join(
            f"{f} {tuple(t.shape)} {DTYPE_NAMES.get(t.dtype, t.dtype)}" for f, t in zip(e.fields, e.tensors))
        lines.append(f"  [{e.index}] {e.layer_type:<13} {e.state_type or '-':<16} {e.size_bytes():>12,} B  "
                     f"tokens {e.tokens}  {shapes}")
    return "\n".join(lines)
