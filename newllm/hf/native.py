"""Export a pure Pythia or Llama stack as a native `GPTNeoXForCausalLM` / `LlamaForCausalLM` folder.

The reverse of `newllm.checkpoints.hf` (which loads such folders): `config.json` written by
transformers' own config class (so its names are this transformers version's) and `model.safetensors`
with Hugging Face's tensor names (`newllm.checkpoints.hf.ours_to_hf`). The folder loads with plain
`transformers.AutoModelForCausalLM.from_pretrained(folder)`: no newllm, no remote code.

Pure means what the native class can express exactly, and nothing else is exported:

* every layer is `pythia` (-> gpt_neox) or every layer is `llama` (-> llama), all with one spec (a Hugging
  Face config applies one set of sizes to every layer);
* no sliding window or attention sinks, no ContextLM feedback (`context_feedback`);
* the final norm is the architecture's (LayerNorm for GPT-NeoX, RMSNorm for Llama) with the layers' epsilon;
* `max_position_embeddings` is set (Hugging Face configs have no "unbounded").

Anything else is refused with one line naming what is not pure.
"""
from __future__ import annotations

from pathlib import Path

from newllm.checkpoints.hf import ours_to_hf
from newllm.errors import NewLLMError
from newllm.files import atomic_write, check_output_dir
from newllm.models.model import TransformerLM

#: newllm layer type -> (model_type, final norm, the layer field holding the norm epsilon)
PURE = {"pythia": ("gpt_neox", "layernorm", "layer_norm_eps"), "llama": ("llama", "rmsnorm", "rms_norm_eps")}
FILES = ("config.json", "model.safetensors")


def native_config(model: TransformerLM):
    """The transformers config (`GPTNeoXConfig` / `LlamaConfig`) equal to `model`'s, or a NewLLMError
    naming why the model is not a pure stack (module doc)."""
    import transformers

    config = model.config
    types = sorted({spec["type"] for spec in config.layers})
    where = f"export_native ({config.name or 'model'})"
    if len(types) != 1 or types[0] not in PURE:
        raise NewLLMError(f"{where}: only a stack of one type, pythia or llama, has a native transformers class; "
                          f"this one has {types}")
    model_type, norm, eps_key = PURE[types[0]]
    spec = config.layers[0]
    if any(s != spec for s in config.layers):
        first = next(i for i, s in enumerate(config.layers) if s != spec)
        raise NewLLMError(f"{where}: layer {first} has another spec than layer 0; a native config applies one to all")
    problems = []
    if spec["sliding_window"] is not None or spec["attention_sinks"]:
        problems.append(f"sliding_window={spec['sliding_window']}, attention_sinks={spec['attention_sinks']}")
    if config.context_feedback is not None:
        problems.append("context_feedback (ContextLM)")
    if type(model) is not TransformerLM:
        problems.append(f"model class {type(model).__name__}")
    if config.norm != norm or config.norm_eps != spec[eps_key]:
        problems.append(f"final norm {config.norm} eps {config.norm_eps} (the native class uses {norm} with the "
                        f"layers' {eps_key} {spec[eps_key]})")
    if config.max_position_embeddings is None:
        problems.append("max_position_embeddings null (unbounded)")
    if model_type == "llama" and spec["hidden_size"] % spec["num_attention_heads"]:
        problems.append(f"hidden_size {spec['hidden_size']} not divisible by num_attention_heads "
                        f"{spec['num_attention_heads']}")
    if problems:
        raise NewLLMError(f"{where}: not a pure {types[0]} stack: {'; '.join(problems)}")
    common = dict(vocab_size=config.vocab_size, hidden_size=spec["hidden_size"], num_hidden_layers=len(config.layers),
                  num_attention_heads=spec["num_attention_heads"], intermediate_size=spec["intermediate_size"],
                  max_position_embeddings=config.max_position_embeddings, initializer_range=spec["initializer_range"],
                  bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                  tie_word_embeddings=config.tie_word_embeddings, attention_bias=spec["attention_bias"],
                  dtype=config.dtype)
    if model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(
            **common, hidden_act=spec["hidden_act"], layer_norm_eps=spec["layer_norm_eps"],
            use_parallel_residual=spec["use_parallel_residual"], attention_dropout=0.0, hidden_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": spec["rotary_emb_base"],
                             "partial_rotary_factor": spec["rotary_pct"]})
    return transformers.LlamaConfig(
        **common, num_key_value_heads=spec["num_key_value_heads"], head_dim=spec["head_dim"], hidden_act="silu",
        rms_norm_eps=spec["rms_norm_eps"], mlp_bias=spec["mlp_bias"], attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]})


def export_native(model: TransformerLM, folder, force: bool = False) -> Path:
    """Write `model` (a pure Pythia or Llama stack, module doc) to `folder` as a native Hugging Face
    checkpoint: `config.json` + `model.safetensors`. Existing files of those names are replaced only
    with `force`. Returns the folder."""
    from safetensors.torch import save_file

    if not isinstance(model, TransformerLM):
        raise NewLLMError(f"export_native: expected a newllm TransformerLM, got {type(model).__name__}")
    hf_config = native_config(model)
    model_type = hf_config.model_type
    hf_config.architectures = ["GPTNeoXForCausalLM" if model_type == "gpt_neox" else "LlamaForCausalLM"]
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: the native class ties the head to the embedding on load
        tensors[ours_to_hf(name, model_type)] = t.detach().to("cpu").contiguous().clone()
    folder = check_output_dir(folder, FILES, force, flag="force=True")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = hf_config.to_json_string(use_diff=False)
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return folder

