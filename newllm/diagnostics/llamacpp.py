"""The llama.cpp side: a GGUF file run by llama.cpp, its graph nodes read with the eval callback.

    ref = trace_llamacpp("model.gguf", ids)        # a Trace with newllm's point names

Needs `llama-cpp-python` (the optional extra `newllm[llamacpp]`, built from source; see README).
The high-level `Llama` object does not expose the eval callback, so this uses the low-level API:
`llama_context_params.cb_eval` (ggml's `ggml_backend_sched_eval_callback`, called twice per graph
node: with ask=true, "do you want this tensor?", then with ask=false once it is computed), flash
attention off (so `kqv_out` exists as a node), one micro-batch holding every token and logits
requested for every token (else the last layer keeps only the output rows: `inp_out_ids`).

Node map (llama.cpp 0.3.36's `llm_build_llama`; node names are `{name}-{layer}`):

    embed       embd (GET_ROWS of token_embd.weight; `inp_embd` in other versions)
                                             attn_norm   attn_norm (MUL by blk.i.attn_norm.weight)
    q, k, v     Qcur/Kcur/Vcur (MUL_MAT by blk.i.attn_q/k/v.weight)
    q_rope      Qcur (ROPE)                  k_rope      Kcur (ROPE)
    attn_ctx    kqv_out                      attn_out    attn_out (MUL_MAT by blk.i.attn_output.weight)
    resid_mid   ffn_inp (ADD)                ffn_norm    ffn_norm (MUL by blk.i.ffn_norm.weight)
    gate, up    ffn_gate/ffn_up (MUL_MAT)    act         ffn_swiglu (GLU)
    mlp_out     ffn_out (MUL_MAT by blk.i.ffn_down.weight)
    resid_post  l_out, or ffn_out (ADD): `ffn_out` names both the FFN output and the residual
                after it (the later `l_out` renames the ADD only when build_cvec returns it as is)
    resid_pre   l_out of layer i-1 (embed for layer 0)
    final_norm  result_norm                  logits      result_output

Nodes are matched by name, op and the weight they read (src[0] of a MUL_MAT, src[1] of a MUL),
as llama-imatrix does, so a renamed or extra node is never taken for another. The GGUF converter
permutes Q/K rows within each head (interleaved pairs for llama.cpp's adjacent-pair RoPE): q, k,
q_rope and k_rope are permuted back before comparing, channel for channel. ggml lists dimensions
innermost first (ne0 = channels); a node (ne0, ne1, ne2) is read as numpy (ne2, ne1, ne0) and
flattened to (T, C).

The `ggml_tensor` struct is mirrored with ctypes (`GGMLTensor`); `check_layout(ggml_h)` compares
its offsets with the struct in the installed `ggml.h`, and every captured node is checked against
ggml's own `ggml_nbytes`, so a layout change fails loudly instead of reading garbage.
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import numpy as np
import torch

from newllm.diagnostics.trace import Trace, compile_points, order_points
from newllm.errors import NewLLMError

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16}


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` of ggml.h (llama-cpp-python 0.3.36)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


# ------------------------------------------------------------------ the struct layout, checked against ggml.h
_C_TYPES = {"enum": (4, 4), "int64_t": (8, 8), "size_t": (8, 8), "int32_t": (4, 4), "char": (1, 1), "ptr": (8, 8)}


def header_layout(ggml_h: str) -> dict[str, int]:
    """Field -> byte offset of `struct ggml_tensor` as declared in the text of ggml.h (x86-64 LP64 C)."""
    defines = {m[0]: m[1] for m in re.findall(r"#\s*define\s+(GGML_MAX_\w+)\s+(\d+)", ggml_h)}
    m = re.search(r"struct ggml_tensor \{(.*?)\n\s*\};", ggml_h, re.S)
    if m is None:
        raise NewLLMError("ggml.h: no `struct ggml_tensor { ... };` found")
    offsets, off = {}, 0
    for line in m.group(1).splitlines():
        line = line.split("//")[0].strip()
        d = re.match(r"(?:struct\s+|enum\s+)?([\w]+)\s*(\*?)\s*(\w+)\s*(?:\[([^\]]+)\])?\s*;", line)
        if d is None:
            continue
        ctype, ptr, name, count = d.groups()
        kind = "ptr" if ptr else ("enum" if line.startswith("enum") else ctype)
        if kind not in _C_TYPES:
            raise NewLLMError(f"ggml.h: struct ggml_tensor field {name!r} has type {ctype!r} this check does not know")
        size, align = _C_TYPES[kind]
        n = 1
        if count:
            expr = count
            for k, v in defines.items():
                expr = expr.replace(k, v)
            e = re.fullmatch(r"\s*(\d+)\s*(?:/\s*sizeof\((\w+)\)\s*)?", expr)  # N or N / sizeof(type)
            if e is None or (e.group(2) and e.group(2) not in _C_TYPES):
                raise NewLLMError(f"ggml.h: cannot evaluate the size {count!r} of field {name!r}")
            n = int(e.group(1)) // (_C_TYPES[e.group(2)][0] if e.group(2) else 1)
        off = -(-off // align) * align
        offsets[name] = off
        off += size * n
    offsets["__size__"] = -(-off // 8) * 8
    return offsets


def check_layout(ggml_h: str) -> dict[str, int]:
    """Raise if `GGMLTensor`'s field offsets or size differ from the struct in `ggml_h`'s text."""
    want = header_layout(ggml_h)
    have = {name: getattr(GGMLTensor, name).offset for name, _ in GGMLTensor._fields_}
    have["__size__"] = ctypes.sizeof(GGMLTensor)
    if want != have:
        diff = {k: (have.get(k), want.get(k)) for k in set(want) | set(have) if have.get(k) != want.get(k)}
        raise NewLLMError(f"ggml_tensor layout differs from ggml.h (ours, header): {diff}")
    return have


def installed_ggml_h() -> Path | None:
    """The ggml.h that came with the installed llama_cpp package, if it ships one."""
    import llama_cpp

    root = Path(llama_cpp.__file__).parent
    # the wheel installs its headers beside the package (site-packages/include)
    for cand in (root.parent / "include" / "ggml.h", root / "include" / "ggml.h", root / "lib" / "include" / "ggml.h"):
        if cand.is_file():
            return cand
    return None


# ------------------------------------------------------------------ library handles
def _llama():
    try:
        import llama_cpp
    except ImportError:
        raise NewLLMError("the llama.cpp side needs llama-cpp-python (pip install 'newllm[llamacpp]', built from "
                          "source: see README)") from None
    return llama_cpp


def _ggml():
    from llama_cpp._ggml import libggml

    lib = libggml
    lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


_BACKEND = {"ready": False}
GGML_LOG_LEVEL_ERROR = 4


def _log(level, text, user_data):  # llama.cpp logs every tensor it loads: keep its errors only
    if level == GGML_LOG_LEVEL_ERROR and text:
        os.write(2, text)


def _init(L):
    if not _BACKEND["ready"]:
        _BACKEND["log"] = L.llama_log_callback(_log)  # kept alive: llama.cpp holds the pointer
        L.llama_log_set(_BACKEND["log"], None)
        L.llama_backend_init()
        _BACKEND["ready"] = True


def _tensor(ptr) -> GGMLTensor:
    return GGMLTensor.from_address(ptr)


def _name(ptr) -> str:
    return _tensor(ptr).name.decode(errors="replace") if ptr else ""


class _Model:
    """A loaded llama.cpp model (freed on close)."""

    def __init__(self, path):
        self.L = L = _llama()
        _init(L)
        if not Path(path).is_file():
            raise NewLLMError(f"{path}: no such GGUF file")
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise NewLLMError(f"{path}: llama.cpp could not load this GGUF file")
        self.vocab = L.llama_model_get_vocab(self.model)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        n = len(data) + 8
        buf = (self.L.llama_token * n)()
        got = self.L.llama_tokenize(self.vocab, data, len(data), buf, n, False, False)
        if got < 0:
            raise NewLLMError(f"llama.cpp tokenizer needs {-got} tokens, more than {n}")
        return list(buf[:got])

    def close(self):
        if self.model:
            self.L.llama_model_free(self.model)
            self.model = None


def llamacpp_token_ids(path, text: str) -> list[int]:
    """`text` tokenised by llama.cpp's tokenizer for the file (no BOS, specials not parsed)."""
    m = _Model(path)
    try:
        return m.tokenize(text)
    finally:
        m.close()


def file_is_float(path) -> bool:
    """True when every tensor of the GGUF is F32 (llama.cpp's matmuls then stay float32)."""
    from newllm.checkpoints.gguf import open_gguf

    return all(int(t.tensor_type) == GGML_TYPE_F32 for t in open_gguf(path).tensors)


# ------------------------------------------------------------------ which node is which point
_LAYER_NODE = re.compile(r"^(\w+)-(\d+)$")
#: (llama.cpp name, op) -> (point, weight the node must read, which src holds it) ; weight None: not checked
NODE_RULES = {
    ("attn_norm", "MUL"): ("attn_norm", "attn_norm", 1), ("Qcur", "MUL_MAT"): ("q", "attn_q", 0),
    ("Kcur", "MUL_MAT"): ("k", "attn_k", 0), ("Vcur", "MUL_MAT"): ("v", "attn_v", 0),
    ("Qcur", "ROPE"): ("q_rope", None, None), ("Kcur", "ROPE"): ("k_rope", None, None),
    ("kqv_out", None): ("attn_ctx", None, None), ("attn_out", "MUL_MAT"): ("attn_out", "attn_output", 0),
    ("ffn_inp", "ADD"): ("resid_mid", None, None), ("ffn_norm", "MUL"): ("ffn_norm", "ffn_norm", 1),
    ("ffn_gate", "MUL_MAT"): ("gate", "ffn_gate", 0), ("ffn_up", "MUL_MAT"): ("up", "ffn_up", 0),
    ("ffn_swiglu", None): ("act", None, None), ("ffn_out", "MUL_MAT"): ("mlp_out", "ffn_down", 0),
    ("ffn_out", "ADD"): ("resid_post", None, None), ("l_out", None): ("resid_post", None, None),
}
PERMUTED = ("q", "k", "q_rope", "k_rope")


def node_point(name: str, op: str, srcs: list[str]) -> str | None:
    """Our point name for a llama.cpp node, or None (module docstring)."""
    if name in ("inp_embd", "embd") and op == "GET_ROWS" and srcs[:1] == ["token_embd.weight"]:
        return "embed"
    if name == "result_norm":
        return "final_norm"
    if name == "result_output" and op == "MUL_MAT":
        return "logits"
    m = _LAYER_NODE.match(name)
    if m is None:
        return None
    base, layer = m.group(1), int(m.group(2))
    rule = NODE_RULES.get((base, op)) or NODE_RULES.get((base, None))
    if rule is None:
        return None
    point, weight, src = rule
    if weight is not None and (len(srcs) <= src or srcs[src] != f"blk.{layer}.{weight}.weight"):
        return None
    return f"layers.{layer}.{point}"


def unpermute_channels(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo the GGUF Q/K row permutation on (T, heads * Dh) activations (as gguf.unpermute_qk on rows)."""
    T = x.shape[0]
    return x.reshape(T, heads, -1, 2).transpose(-1, -2).reshape(T, -1)


# ------------------------------------------------------------------ the trace
def trace_llamacpp(path, ids, points: str | None = None, kv_type: str = "f16", threads: int | None = None,
                   side: str = "llama.cpp") -> Trace:
    """Run llama.cpp on `ids` (from an empty cache) and capture newllm's points (module docstring).

    `kv_type`: the KV cache's type, "f16" (llama.cpp's default) or "f32"."""
    from newllm.checkpoints.gguf import field, open_gguf
    from newllm.diagnostics.trace import check_ids

    ids = check_ids(ids)[0].tolist()
    if kv_type not in KV_TYPES:
        raise NewLLMError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
    reader = open_gguf(path)
    arch = field(reader, "general.architecture", path)
    if arch != "llama":
        raise NewLLMError(f"{path}: the llama.cpp side maps llama-architecture graphs, not {arch!r}")
    n_layers = int(field(reader, "llama.block_count", path))
    heads = int(field(reader, "llama.attention.head_count", path))
    kv_heads = int(field(reader, "llama.attention.head_count_kv", path, heads))
    keep = compile_points(points) if points else None
    T = len(ids)
    m = _Model(path)
    L, lib = m.L, _ggml()
    store: dict[str, torch.Tensor] = {}
    seen: list[tuple[str, str]] = []
    problems: list[str] = []

    def wanted(point: str) -> bool:
        """Asked for, or the source of an asked-for resid_pre (a layer's input is the previous output)."""
        if keep is None or keep.search(point):
            return True
        layer = -1 if point == "embed" else (int(point.split(".")[1]) if point.endswith(".resid_post") else None)
        return layer is not None and bool(keep.search(f"layers.{layer + 1}.resid_pre"))

    def classify(ptr) -> str | None:
        t = _tensor(ptr)
        op = (lib.ggml_op_name(t.op) or b"").decode()
        srcs = [_name(s) for s in t.src if s]
        point = node_point(t.name.decode(errors="replace"), op, srcs)
        if point is None or not wanted(point) or point in store:
            return None
        return point

    def callback(ptr, ask, user_data):
        try:
            point = classify(ptr)
            if ask:
                return point is not None
            if point is None:
                return True
            t = _tensor(ptr)
            seen.append((point, t.name.decode()))
            if t.type != GGML_TYPE_F32:
                problems.append(f"{point}: node {t.name.decode()} has ggml type {t.type}, not F32")
                return True
            ne = [int(n) for n in t.ne]
            count = int(np.prod(ne))
            nbytes = lib.ggml_nbytes(ptr)
            if nbytes != 4 * count or int(t.nb[0]) != 4:  # the layout check: ggml's own size of this node
                problems.append(f"{point}: ggml_nbytes {nbytes} != 4 x {ne} (struct layout or a strided view)")
                return True
            buf = np.empty(count, dtype=np.float32)
            lib.ggml_backend_tensor_get(ptr, buf.ctypes.data, 0, nbytes)
            x = torch.from_numpy(buf.reshape(ne[::-1]).reshape(-1, ne[0]) if count else buf)
            rows = count // ne[0]
            x = x.reshape(T, -1) if rows % T == 0 else x  # (ne2, ne1, ne0) -> (T, heads * Dh)
            layer_point = point.rsplit(".", 1)[-1]
            if layer_point in PERMUTED:
                x = unpermute_channels(x, heads if layer_point.startswith("q") else kv_heads)
            store[point] = x.clone()
        except Exception as e:  # never let an exception cross into C
            problems.append(f"callback: {type(e).__name__}: {e}")
        return True

    cb = L.ggml_backend_sched_eval_callback(callback)  # kept alive until decode returns
    cp = L.llama_context_default_params()
    cp.n_ctx = max(T, 16)
    cp.n_batch = cp.n_ubatch = max(T, 16)  # one micro-batch: one graph holds every token
    cp.n_seq_max = 1
    n = threads or os.cpu_count() or 1
    cp.n_threads = cp.n_threads_batch = n
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.type_k = cp.type_v = KV_TYPES[kv_type]
    cp.cb_eval = cb
    cp.cb_eval_user_data = None
    cp.embeddings = False
    ctx = L.llama_init_from_model(m.model, cp)
    if not ctx:
        m.close()
        raise NewLLMError(f"{path}: llama.cpp could not create a context")
    batch = L.llama_batch_init(T, 0, 1)
    try:
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True  # logits for every token
        batch.n_tokens = T
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise NewLLMError(f"{path}: llama_decode returned {rc}")
        V = L.llama_vocab_n_tokens(m.vocab)
        logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(T * V,)).reshape(T, V).copy()
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        m.close()
    if problems:
        raise NewLLMError(f"llama.cpp trace: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1
                                                               else ""))
    if keep is None or keep.search("logits"):
        if "logits" in store and not np.allclose(store["logits"].numpy(), logits, atol=0, rtol=0):
            raise NewLLMError("llama.cpp trace: result_output differs from llama_get_logits")
        store["logits"] = torch.from_numpy(logits)
    for i in range(n_layers):  # a layer's input is the previous layer's output
        name, src = f"layers.{i}.resid_pre", ("embed" if i == 0 else f"layers.{i - 1}.resid_post")
        if src in store and (keep is None or keep.search(name)):
            store[name] = store[src]
    tensors = {k: store[k] for k in order_points(store, n_layers) if keep is None or keep.search(k)}
    return Trace(side, ids, tensors, n_layers, {"kv_type": kv_type, "threads": n, "flash_attn": False,
                                                "nodes": len(seen)})


# ------------------------------------------------------------------ logits over many windows, quantisation
def llamacpp_logits(path, windows, kv_type: str = "f16", threads: int | None = None, progress: bool = True):
    """Yield llama.cpp's (T, V) float32 logits for each window of token ids (each from an empty
    cache; one context, flash attention off, every token's logits)."""
    from tqdm import tqdm

    windows = [list(map(int, w)) for w in windows]
    T = max(len(w) for w in windows)
    m = _Model(path)
    L = m.L
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(T, 16)
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = threads or os.cpu_count() or 1
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.type_k = cp.type_v = KV_TYPES[kv_type]
    ctx = L.llama_init_from_model(m.model, cp)
    if not ctx:
        m.close()
        raise NewLLMError(f"{path}: llama.cpp could not create a context")
    batch = L.llama_batch_init(T, 0, 1)
    V = L.llama_vocab_n_tokens(m.vocab)
    try:
        for w in tqdm(windows, desc=f"llama.cpp {Path(path).name}", disable=None if progress else True, leave=False):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            for i, tok in enumerate(w):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(w)
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise NewLLMError(f"{path}: llama_decode returned {rc}")
            yield torch.from_numpy(np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(w) * V,))
                                   .reshape(len(w), V).copy())
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        m.close()


#: llama.cpp's file types (llama.h `llama_ftype`) by name
FTYPES = {"F32": 0, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def llamacpp_quantize(src, dst, ftype: str, threads: int | None = None) -> Path:
    """Quantise the GGUF `src` (F32/F16) to `dst` with llama.cpp's own quantiser (`llama-quantize`)."""
    L = _llama()
    _init(L)
    if ftype not in FTYPES:
        raise NewLLMError(f"llama.cpp file type must be one of {sorted(FTYPES)}, got {ftype!r}")
    dst = Path(dst)
    if dst.exists():
        raise NewLLMError(f"{dst}: already exists; not replacing it")
    params = L.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads or os.cpu_count() or 1
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise NewLLMError(f"{src}: llama_model_quantize to {ftype} failed ({rc})")
    return dst
