"""The `transformers` reference side: a Llama-family `transformers` model traced at newllm's points.

    hf = load_transformers_model("model.gguf")      # transformers' own GGUF loading (or an HF folder)
    ref = trace_transformers(hf, ids)               # a Trace with the same point names as ours

Point map (transformers 5 `LlamaForCausalLM` / `MistralForCausalLM`):

    embed       model.embed_tokens                resid_pre   model.layers.{i} input
    attn_norm   input_layernorm                   q, k, v     self_attn.{q,k,v}_proj
    q_rope      apply_rotary_pos_emb's outputs    attn_ctx    o_proj input
    attn_out    self_attn output                  resid_mid   post_attention_layernorm input
    ffn_norm    post_attention_layernorm          gate, up    mlp.gate_proj, mlp.up_proj
    act         mlp.down_proj input               mlp_out     mlp output
    resid_post  model.layers.{i} output           final_norm  model.norm;  logits  lm_head

q/k after RoPE are no module's output in transformers: for the traced call only, the modeling
module's `apply_rotary_pos_emb` is wrapped to record what it returns (the layer is known from a
pre-hook on each `self_attn`). The GGUF path goes through `transformers`' converter, which
dequantises with `gguf` and undoes llama.cpp's Q/K permutation itself: a weight path independent
of newllm's loader.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from newllm.diagnostics.trace import Trace, compile_points, heads_first, order_points, tokens_by_channels
from newllm.errors import NewLLMError

FAMILIES = ("llama", "mistral")


def load_transformers_model(source, dtype=torch.float32):
    """A GGUF file (transformers' GGUF loading) or a Hugging Face folder, as a float32 causal LM."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise NewLLMError("the transformers side needs `transformers` (pip install 'newllm[hf]')") from None
    p = Path(source)
    if p.is_file() and p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    elif p.is_dir() and (p / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    else:
        raise NewLLMError(f"{source}: the transformers side needs a .gguf file or a Hugging Face folder "
                          "(config.json)")
    if model.config.model_type not in FAMILIES:
        raise NewLLMError(f"{source}: the transformers side traces {FAMILIES} models, not "
                          f"{model.config.model_type!r}")
    return model.eval()


def transformers_token_ids(source, text: str) -> list[int]:
    """`text` tokenised by transformers' tokenizer for `source` (no special tokens added)."""
    from transformers import AutoTokenizer

    p = Path(source)
    tok = (AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name) if p.suffix == ".gguf"
           else AutoTokenizer.from_pretrained(str(p)))
    return tok(text, add_special_tokens=False)["input_ids"]


def _first_input(args, kwargs, key="hidden_states"):
    return args[0] if args else kwargs[key]


@contextlib.contextmanager
def _rope_recorder(model, store: dict, keep):
    """Wrap the modeling module's apply_rotary_pos_emb for the duration of the call."""
    layers = model.model.layers
    module = sys.modules[type(layers[0].self_attn).__module__]
    original = module.apply_rotary_pos_emb
    current = {"layer": None}
    handles = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, k, i=i: current.__setitem__("layer", i), with_kwargs=True) for i, layer in enumerate(layers)]

    def wrapped(q, k, *args, **kwargs):
        q2, k2 = original(q, k, *args, **kwargs)
        i = current["layer"]
        for name, t in ((f"layers.{i}.q_rope", q2), (f"layers.{i}.k_rope", k2)):
            if (keep is None or keep.search(name)) and name not in store:
                store[name] = heads_first(t)
        return q2, k2

    module.apply_rotary_pos_emb = wrapped
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = original
        for h in handles:
            h.remove()


@torch.no_grad()
def trace_transformers(model, ids, points: str | None = None, side: str = "transformers") -> Trace:
    """Run a Llama-family transformers model on `ids` and capture newllm's points (module doc)."""
    from newllm.diagnostics.trace import check_ids

    ids = check_ids(ids)
    if model.config.model_type not in FAMILIES:
        raise NewLLMError(f"the transformers side traces {FAMILIES} models, not {model.config.model_type!r}")
    keep = compile_points(points) if points else None
    store: dict[str, torch.Tensor] = {}
    handles = []

    def add(name, module, where):
        if keep is not None and not keep.search(name):
            return

        def put(x):
            x = x[0] if isinstance(x, tuple) else x
            if name not in store:
                store[name] = tokens_by_channels(x)
        if where == "in":
            handles.append(module.register_forward_pre_hook(lambda m, a, k: put(_first_input(a, k)), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o: put(o)))

    base = model.model
    add("embed", base.embed_tokens, "out")
    for i, layer in enumerate(base.layers):
        p, at, mlp = f"layers.{i}.", layer.self_attn, layer.mlp
        for name, module, where in (
                ("resid_pre", layer, "in"), ("attn_norm", layer.input_layernorm, "out"), ("q", at.q_proj, "out"),
                ("k", at.k_proj, "out"), ("v", at.v_proj, "out"), ("attn_ctx", at.o_proj, "in"),
                ("attn_out", at, "out"), ("resid_mid", layer.post_attention_layernorm, "in"),
                ("ffn_norm", layer.post_attention_layernorm, "out"), ("gate", mlp.gate_proj, "out"),
                ("up", mlp.up_proj, "out"), ("act", mlp.down_proj, "in"), ("mlp_out", mlp, "out"),
                ("resid_post", layer, "out")):
            add(p + name, module, where)
    add("final_norm", base.norm, "out")
    add("logits", model.lm_head, "out")
    try:
        with _rope_recorder(model, store, keep):
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = len(base.layers)
    return Trace(side, ids[0].tolist(), {k: store[k] for k in order_points(store, n)}, n,
                 {"dtype": str(next(model.parameters()).dtype), "transformers_class": type(model).__name__})
