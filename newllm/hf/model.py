"""`NewLLMForCausalLM`: any newllm model as a `transformers` causal LM (from_pretrained, generate, beams).

    hf = newllm.hf.to_hf(model)                      # wraps the model (shares its weights)
    hf.save_pretrained("out")                        # config.json + model.safetensors (no pickle)
    hf = AutoModelForCausalLM.from_pretrained("out") # after `import newllm.hf`
    hf.generate(ids, max_new_tokens=20)              # greedy, sampling, beam search ...
    hf.generate(ids, state=memory, max_new_tokens=20)   # continue from a carried memory state

State. The per-layer state (KV caches, compressive memories, ContextLM's feedback: newllm's own state
tuples, newllm/models/state.py) is carried through `generate` as a stateful model, the way
transformers' RWKV port does it: `forward(..., state=)` returns `output.state`, and
`_update_model_kwargs_for_generation` hands it to the next step, which then gets only the new token.
`_reorder_cache` moves its batch rows for beam search, `_expand_inputs_for_generation` repeats a
user's state for beams / `num_return_sequences` (a batch-1 state broadcasts as it is).

The state is passed as `state=`, not as transformers 5's `cache=` (formerly `past_key_values=`):
generate treats whatever is called `cache` as a `transformers.Cache` (`get_seq_length`,
`is_compileable`, ...), which newllm's states are not and should not have to chase (the
flash-linear-attention lesson). `_supports_default_dynamic_cache()` is False so that generate never
builds a `DynamicCache` for us, and `cache=` / `past_key_values=` are refused by name.

What is never done silently: an `attention_mask` with padding (a zero anywhere) is refused (newllm's
states have no notion of padding: run prompts of one length, or one at a time); `position_ids` are
ignored because positions come from the state (a KV cache knows its next position); the model's own
held memory (`model.set_memory_state`) is never read here: the HF model is a pure function of
`input_ids` and `state=`.

Loading (transformers 5 quirks): `from_pretrained` builds the model on the meta device and then refills
every non-persistent buffer with `torch.empty`, so RoPE's `inv_freq` came back as garbage (logits off
by 1e-3). `_init_weights`, which transformers calls for every module it did not fill from the file,
recomputes those buffers from a fresh build of the same layer (parameters are never touched there).
`from_pretrained` here reads safetensors only and turns a missing, unexpected or mis-shaped weight into
a `NewLLMError` instead of transformers' warning and a random init. The loaded weights are then copied
into memory of their own: transformers leaves them as views into the memory-mapped file, at offsets
that are not 64-byte aligned, and CPU matmul kernels then sum in another order (logits 1e-6 off the
original model's instead of bit-equal); a view also changes if the file is rewritten under it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from newllm.config import DTYPE_NAMES, MODEL_DTYPES
from newllm.errors import NewLLMError
from newllm.hf.config import NewLLMConfig
from newllm.models.context import build_model
from newllm.models.layers import build_layer
from newllm.models.model import TransformerLM


@dataclass
class NewLLMCausalLMOutput(ModelOutput):
    """transformers' causal-LM output with newllm's per-layer `state` (one entry per layer, then any
    model-level entries) in place of `past_key_values`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: tuple | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def check_attention_mask(mask) -> None:
    """Refuse padding: a mask is accepted only when every entry is 1 (module doc)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise NewLLMError(f"attention_mask must be a (batch, tokens) tensor, got "
                          f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if not bool((mask == 1).all()):
        row, col = (mask != 1).nonzero()[0].tolist()
        raise NewLLMError(f"attention_mask has padding (a 0 at batch {row}, position {col}): newllm models carry "
                          "per-layer state and take no padded batches; give prompts of one length, or one at a time")


def map_state(state, fn):
    """Apply `fn(tensor)` to every batched tensor (dim >= 1) of a raw state; 0-dim counters are kept."""
    return tuple(None if s is None else type(s)(*(fn(t) if t.dim() >= 1 else t for t in s)) for s in state)


class NewLLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A newllm model (`TransformerLM` or `ContextLM`) for `transformers` (module doc)."""

    config_class = NewLLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # applied only when the config ties them
    supports_gradient_checkpointing = False

    def __init__(self, config: NewLLMConfig, model: TransformerLM | None = None):
        super().__init__(config)
        model_config, wrapped = config.model_config, model is not None
        want = DTYPE_NAMES.get(config.dtype) if isinstance(config.dtype, torch.dtype) else None
        if model is None and want is not None and want != model_config.dtype:  # from_pretrained(dtype=...)
            if want not in MODEL_DTYPES:
                raise NewLLMError(f"NewLLMForCausalLM: dtype {want} is not one of {sorted(MODEL_DTYPES)}")
            model_config = dataclasses.replace(model_config, dtype=want)
            config.newllm_config = model_config.to_dict()
        if model is None:
            model = build_model(model_config)
        elif not isinstance(model, TransformerLM):
            raise NewLLMError(f"NewLLMForCausalLM: model must be a newllm TransformerLM, got {type(model).__name__}")
        elif model.config.to_dict() != model_config.to_dict():
            raise NewLLMError("NewLLMForCausalLM: the model's config differs from config.newllm_config")
        self.model = model
        self._wrapped = wrapped  # an existing model's buffers are its own: _init_weights leaves them
        self.post_init()
        self._wrapped = False
        self.__dict__.pop("_fresh_builds", None)  # the builds _init_weights made for the buffers

    # ------------------------------------------------------------------ transformers plumbing
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is newllm's own (module doc): generate must not build a DynamicCache

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.lm_head = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Recompute `module`'s own non-persistent buffers (RoPE inv_freq, ...) from a fresh build of the
        layer (or model shell) it belongs to; parameters are left as they are (module doc)."""
        names = [n for n in module._non_persistent_buffers_set if getattr(module, n, None) is not None]
        if not names or self.__dict__.get("_wrapped"):
            return
        fresh = self._fresh_counterpart(module)
        for n in names:
            buf = getattr(module, n)
            buf.copy_(getattr(fresh, n).to(dtype=buf.dtype, device=buf.device))

    def _fresh_counterpart(self, module: nn.Module) -> nn.Module:
        """The module at the same place in a freshly built layer (or one-layer model shell), built on the
        CPU with the global RNG left as it was; builds are kept per layer spec while loading."""
        path = next((name for name, m in self.model.named_modules() if m is module), None)
        if path is None:
            raise NewLLMError(f"NewLLMForCausalLM: {type(module).__name__} with non-persistent buffers is not part "
                              "of the wrapped newllm model")
        config = self.config.model_config
        parts = path.split(".")
        cache = self.__dict__.setdefault("_fresh_builds", {})
        if len(parts) >= 2 and parts[0] == "layers":
            spec = config.layers[int(parts[1])]
            key, rest = json.dumps(spec, sort_keys=True), ".".join(parts[2:])
            build = lambda: build_layer(spec)  # noqa: E731
        else:
            key, rest = "model", path
            build = lambda: build_model(dataclasses.replace(config, layers=config.layers[:1]))  # noqa: E731
        if key not in cache:
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                cache[key] = build()
        return cache[key].get_submodule(rest)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, reading safetensors only and strict about weights (module doc)."""
        if kwargs.get("use_safetensors") is False:
            raise NewLLMError("NewLLMForCausalLM.from_pretrained: use_safetensors=False would read pickle files; "
                              "newllm reads model.safetensors only")
        kwargs["use_safetensors"] = True
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except RuntimeError as e:
            if "ignore_mismatched_sizes" not in str(e):
                raise
            raise NewLLMError(f"{pretrained_model_name_or_path}: a weight's shape does not fit config.json's model "
                              "(transformers' load report above names it)") from None
        model.__dict__.pop("_fresh_builds", None)
        with torch.no_grad():  # own memory, not views into the file transformers mapped (module doc)
            for param in model.parameters():  # a tied weight is one Parameter: copied once, still tied
                param.data = param.data.clone(memory_format=torch.contiguous_format)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            found = sorted(map(str, info.get(key) or ()))
            if found:
                raise NewLLMError(f"{pretrained_model_name_or_path}: {key.replace('_', ' ')} {found[:5]}"
                                  f"{' ...' if len(found) > 5 else ''} (the weights do not fit config.json's model)")
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ state
    def raw_state(self, state):
        """A raw per-layer state tuple from `state`: a `ModelMemoryState` (validated against the model:
        fingerprints, layer types, shapes), a raw tuple (checked), or None."""
        from newllm.models.state import ModelMemoryState, unpack

        if state is None:
            return None
        if isinstance(state, ModelMemoryState):
            return unpack(self.model, state)
        if not isinstance(state, (tuple, list)):
            raise NewLLMError(f"state must be a ModelMemoryState, a tuple of per-layer states (output.state) or None, "
                              f"got a {type(state).__name__}")
        state = tuple(state)
        self.model.check_state(state)
        return state

    def _reorder_cache(self, state, beam_idx: torch.LongTensor):
        """Beam search: row b of the new state is row beam_idx[b] of the old one, in every batched tensor."""
        return map_state(state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids=None, **model_kwargs):
        state = model_kwargs.pop("state", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids,
                                                                        **model_kwargs)
        if state is not None and expand_size > 1:  # a batch-1 state broadcasts to any batch as it is
            state = map_state(state, lambda t: t if t.shape[0] == 1 else t.repeat_interleave(expand_size, dim=0))
        if state is not None:
            model_kwargs["state"] = state
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        # as RWKV: the state is not called `cache`, so hand it on here; without use_cache every step reruns
        # the whole sequence from the user's initial state, which therefore stays in place
        if model_kwargs.get("use_cache", True) and outputs.get("state") is not None:
            model_kwargs["state"] = outputs.state
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)

    @torch.no_grad()
    def generate(self, *args, state=None, **kwargs):
        """`GenerationMixin.generate`, continuing from `state` (a `ModelMemoryState` or a raw state tuple)."""
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                raise NewLLMError(f"generate: {key}= is not how newllm carries state; pass state= (a ModelMemoryState "
                                  "or output.state)")
        check_attention_mask(kwargs.get("attention_mask"))
        state = self.raw_state(state)
        if state is not None:
            kwargs["state"] = state
        return super().generate(*args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                state=None, labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, output_hidden_states: bool | None = None, return_dict: bool | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache=None, past_key_values=None, output_attentions: bool | None = None):
        """Logits (B, T, V) for `input_ids` continuing from `state` (None: nothing seen), and the new state.

        No `**kwargs`: transformers checks generate's arguments against this signature, so a typo there
        is an error, not silently ignored. `position_ids` are ignored (positions come from the state)."""
        for key, value in (("cache", cache), ("past_key_values", past_key_values)):
            if value is not None:
                raise NewLLMError(f"forward: {key}= is not how newllm carries state; pass state= (output.state)")
        if output_attentions:
            raise NewLLMError("forward: output_attentions is not supported (newllm layers do not return attention maps)")
        if inputs_embeds is not None:
            raise NewLLMError("forward: inputs_embeds is not supported (newllm models take input_ids)")
        if input_ids is None:
            raise NewLLMError("forward: input_ids is required")
        if isinstance(logits_to_keep, torch.Tensor) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
            raise NewLLMError(f"forward: logits_to_keep must be an integer >= 0, got {logits_to_keep!r}")
        check_attention_mask(attention_mask)
        state = self.raw_state(state)
        with self.model.memory_aside():  # the model's held memory is never read (module doc)
            out = self.model(input_ids, labels=labels, state=state, output_hidden_states=bool(output_hidden_states),
                             logits_to_keep=int(logits_to_keep))
        hidden = tuple(out.hidden_states) if out.hidden_states is not None else None
        new_state = out.state if use_cache is not False else None
        if return_dict is False:
            return tuple(v for v in (out.loss, out.logits, new_state, hidden) if v is not None)
        return NewLLMCausalLMOutput(loss=out.loss, logits=out.logits, state=new_state, hidden_states=hidden)


def to_hf(model: TransformerLM) -> NewLLMForCausalLM:
    """Wrap an existing newllm model for `transformers`. The wrapper shares the model's parameters (no
    copy): training one trains the other. Its held memory is not read (pass `state=` instead)."""
    if not isinstance(model, TransformerLM):
        raise NewLLMError(f"to_hf: expected a newllm TransformerLM, got {type(model).__name__}")
    return NewLLMForCausalLM(NewLLMConfig.from_model_config(model.config), model=model)
