"""TransformerLM: embedding -> any stack of registered layers -> final norm -> LM head.

The model is a thin shell around pure layers. State flows explicitly::

    out = model(ids, state=s)          # out.logits (B, T, V), out.state: one entry per layer

and, for convenience, the model can hold a state of its own (the "memory")::

    model.reset_memory()
    model(ids, update_memory=True)     # reads the held memory and replaces it with the new one
    model(ids)                         # reads the held memory, leaves it unchanged
    s = model.get_memory_state(); model.set_memory_state(s)

A held memory is stored detached (it outlives the step that made it: keeping its graph would make
the next backward run through a freed graph, the seeds' double-backward bug). An explicit `state=`
is returned with its graph, so a training loop decides what to detach.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from newllm.config import ModelConfig
from newllm.errors import NewLLMError
from newllm.models.layers import BaseLayer, RMSNorm, build_layer
from newllm.models.ops.loss import linear_cross_entropy

State = tuple  # one per-layer state (NamedTuple of tensors, or None) per layer


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when the loss came from targets= (never built whole)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy when labels were given
    state: State | None = None  # per-layer states after this call
    hidden_states: list[torch.Tensor] | None = None  # embedding output, then each layer's output


def _map_state(state, fn):
    if state is None:
        return None
    return type(state)(*(fn(t) for t in state))


def expand_state(state: State | None, batch_size: int) -> State | None:
    """Broadcast per-layer states taken at batch size 1 to `batch_size` (no copy)."""
    if state is None:
        return None

    def expand(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[0] == 1 and batch_size != 1:
            return t.expand(batch_size, *t.shape[1:])
        if t.dim() >= 1 and t.shape[0] != batch_size:
            raise NewLLMError(f"memory state has batch size {t.shape[0]}, input has {batch_size}; "
                              "only a batch-size-1 state broadcasts")
        return t

    return tuple(_map_state(s, expand) for s in state)


def detach_state(state: State | None) -> State | None:
    if state is None:
        return None
    # a tensor outside any graph is kept as it is: a KV cache that is a view of its preallocated
    # buffer stays one, so the next call appends in place (newllm.models.layers.attention._append)
    return tuple(_map_state(s, lambda t: t.detach() if t.requires_grad or t.grad_fn is not None else t) for s in state)


class TransformerLM(nn.Module):
    """A language model whose layers are any registered layer types (see `newllm.models.layers`)."""

    #: NamedTuple classes of the model-level state entries after the layers' (ContextLM: FeedbackState)
    extra_state_types: tuple[type, ...] = ()

    def __init__(self, layers: Sequence[BaseLayer] | None = None, *, config: ModelConfig | None = None, **fields):
        super().__init__()
        if layers is not None and config is not None:
            raise NewLLMError("TransformerLM: pass layers= or config=, not both")
        if layers is not None:
            layers = list(layers)
            bad = [type(l).__name__ for l in layers if not isinstance(l, BaseLayer)]
            if bad:
                raise NewLLMError(f"TransformerLM: layers must be BaseLayer instances, got {bad}")
            config = ModelConfig(layers=[l.spec() for l in layers], **fields)
        elif config is None:
            raise NewLLMError("TransformerLM: pass layers= (a list of layer objects) or config=")
        elif fields:
            raise NewLLMError(f"TransformerLM: unexpected arguments {sorted(fields)} beside config=")
        else:
            layers = [build_layer(spec) for spec in config.layers]
        self.config = config
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(layers)
        self.norm = (nn.LayerNorm(d, eps=config.norm_eps) if config.norm == "layernorm"
                     else RMSNorm(d, config.norm_eps))
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.initializer_range)
        self._memory: State | None = None
        self.to(config.torch_dtype)

    # ------------------------------------------------------------------ forward
    def check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise NewLLMError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise NewLLMError(f"input_ids has no tokens (shape {tuple(input_ids.shape)}); give at least one")
        if input_ids.numel() == 0 or torch.compiler.is_compiling():
            # reading the ids' range back is a graph break under torch.compile; a compiled caller checks its
            # ids before (the Trainer its token arrays, sliding_window_perplexity its text)
            return
        hi, lo = int(input_ids.max()), int(input_ids.min())
        if hi >= self.config.vocab_size or lo < 0:
            bad = hi if hi >= self.config.vocab_size else lo
            where = (input_ids == bad).nonzero()[0].tolist()
            raise NewLLMError(f"token id {bad} at (batch, position) {tuple(where)} is outside the "
                              f"vocabulary [0, {self.config.vocab_size})")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, state: State | None = None,
                update_memory: bool = False, output_hidden_states: bool = False, logits_to_keep: int = 0,
                targets: torch.Tensor | None = None, loss_chunk: int | None = None) -> LMOutput:
        """Logits for `input_ids` (B, T), continuing from `state` (default: the held memory).

        `logits_to_keep` > 0 (as in transformers) projects only the last that many positions onto the
        vocabulary: logits (B, logits_to_keep, V). Sliding-window evaluation scores only a window's
        tail, and the LM head is half the work of a Pythia-70m-sized model.

        `labels` (B, T) are the inputs' own ids (transformers' convention: logits at t score
        labels[t + 1]); `targets` (B, T) are the next token of each position, aligned (logits at t
        score targets[t]), and with them the loss is computed from the hidden states by chunks of
        `loss_chunk` positions (`newllm.models.ops.loss`; None: all at once): the (B, T, V) logits are
        never built and `logits` is None. -100 is ignored in both.
        """
        check_loss_args(labels, targets, logits_to_keep, loss_chunk)
        self.check_ids(input_ids)
        explicit = state is not None
        if not explicit:
            state = self._memory
        self.check_state(state)
        state = expand_state(state, input_ids.shape[0])
        x = self.embed(input_ids)
        hidden = [x] if output_hidden_states else None
        new_state = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, None if state is None else state[i])
            new_state.append(s)
            if hidden is not None:
                hidden.append(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, k, d)
        new_state = tuple(new_state)
        if update_memory:
            self._memory = detach_state(new_state)
        if targets is not None:
            loss = head_loss(self.norm(x), self.lm_head, targets, loss_chunk)
            return LMOutput(logits=None, loss=loss, state=new_state, hidden_states=hidden)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            loss = lm_loss(logits, labels)
        return LMOutput(logits=logits, loss=loss, state=new_state, hidden_states=hidden)

    # ------------------------------------------------------------------ memory shell
    # The held memory is kept as the raw per-entry tuple (what forward threads through the layers);
    # get/set_memory_state convert it to and from the self-describing ModelMemoryState
    # (newllm/models/state.py), which is what travels between processes and machines.
    def reset_memory(self) -> None:
        """Forget everything: the next call starts from an empty state."""
        self._memory = None

    @contextlib.contextmanager
    def memory_aside(self, train: bool | None = None) -> Iterator["TransformerLM"]:
        """Inside the block the model holds no memory (every call starts empty), and with `train`
        given it is in that mode; on exit the held memory and the mode are what they were.

        What every evaluation and fine-tune does so that a memory a user absorbed is neither read
        nor lost::

            with model.memory_aside(train=False), torch.no_grad():
                ppl = ...
        """
        held, was_training = self._memory, self.training
        self._memory = None
        if train is not None:
            self.train(train)
        try:
            yield self
        finally:
            self._memory = held
            self.train(was_training)

    def init_state(self, batch_size: int) -> State:
        """The raw state of nothing seen (each layer's `init_state`): `model(x, state=init_state(B))`
        equals `model(x)`."""
        p = next(self.parameters())
        return tuple(layer.init_state(batch_size, p.device, p.dtype) for layer in self.layers)

    def check_state(self, state: State | None) -> None:
        """Raise if a raw state tuple does not have one entry per layer (subclasses add entries)."""
        if state is not None and len(state) != len(self.layers):
            raise NewLLMError(f"memory state has {len(state)} layer entries, model has {len(self.layers)} layers")

    def get_memory_state(self, compact: bool = False):
        """The held memory as a `ModelMemoryState` (None if nothing is held).

        `compact=True` keeps only the layers with a compressive memory and leaves every KV cache
        empty; continuing from it runs the attention layers from an empty cache (see state.py).
        """
        from newllm.models.state import snapshot

        return None if self._memory is None else snapshot(self, self._memory, compact=compact)

    def set_memory_state(self, state, allow_weight_mismatch: bool = False) -> None:
        """Hold `state`: a `ModelMemoryState` (validated against this model: fingerprints of config
        and weights, layer types, shapes; moved to the model's device), a raw per-layer tuple, or
        None (= reset). A state taken with other weights is refused unless `allow_weight_mismatch`."""
        from newllm.models.state import ModelMemoryState, unpack

        if isinstance(state, ModelMemoryState):
            state = unpack(self, state, allow_weight_mismatch=allow_weight_mismatch)
        elif isinstance(state, (tuple, list)):
            bad = [i for i, s in enumerate(state)
                   if s is not None and not (isinstance(s, tuple) and hasattr(type(s), "_fields")
                                             and all(isinstance(t, torch.Tensor) for t in s))]
            if bad:
                raise NewLLMError(f"set_memory_state: entry {bad[0]} is a {type(state[bad[0]]).__name__}, expected a "
                                  "layer state (a NamedTuple of tensors) or None")
            state = detach_state(tuple(state))
        elif state is not None:
            raise NewLLMError(f"set_memory_state: expected a ModelMemoryState (newllm.load_memory_state or "
                              f"model.get_memory_state()), a tuple of per-layer states, or None; got a "
                              f"{type(state).__name__}")
        self.check_state(state)
        self._memory = state

    def memory_size_bytes(self, state=None) -> list[int]:
        """Bytes per layer (then per model-level entry) of `state` (a ModelMemoryState or raw tuple;
        default the held memory), measured from its tensors. With nothing held: each layer's empty
        state (`init_state` at batch 1: a memory layer's fixed memory, a KV cache's position counter)."""
        from newllm.models.state import ModelMemoryState, snapshot

        if state is None and self._memory is None:
            return [0 if s is None else sum(t.numel() * t.element_size() for t in s) for s in self.init_state(1)]
        if state is None:
            state = self._memory
        if not isinstance(state, ModelMemoryState):
            state = snapshot(self, tuple(state))
        return state.size_bytes()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (default) or sampled decoding; returns the prompt followed by the new tokens.

        The prompt is run once and each new token reuses the per-layer states (KV caches and
        memories), starting from the held memory if there is one. `eos_token_id` is one id or
        several (end of text, end of turn): a row stops at the first of them and is padded with it
        afterwards, as `transformers` does.
        """
        check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise NewLLMError(f"generate: the prompt must be (batch, tokens) with at least one token, got shape "
                              f"{tuple(input_ids.shape)} (an empty prompt has nothing to continue)")
        stops = ([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                 else list(eos_token_id))
        stop_ids = torch.tensor(stops, dtype=torch.long, device=input_ids.device)
        if max_new_tokens == 0:
            return input_ids
        P = input_ids.shape[1]
        out = input_ids.new_empty((input_ids.shape[0], P + max_new_tokens))  # no copy of the ids per token
        out[:, :P] = input_ids
        res = self(input_ids, state=self._memory, logits_to_keep=1)  # the prompt's last position only
        state, logits = res.state, res.logits[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits.float(), do_sample, temperature, top_k, top_p, generator)
            if stops:
                pad = out[:, P + step - 1] if step else torch.full_like(nxt, stops[0])  # a finished row repeats its stop id
                nxt = torch.where(done, pad, nxt)
                done = done | torch.isin(nxt, stop_ids)
            out[:, P + step] = nxt
            if step + 1 == max_new_tokens or (stops and bool(done.all())):
                return out[:, :P + step + 1]
            res = self(nxt[:, None], state=state)
            state, logits = res.state, res.logits[:, -1]
        return out

    # ------------------------------------------------------------------ info
    @property
    def receptive_field(self) -> int | None:
        """How many tokens back the logits at t can depend on other than through a compressive memory:
        the sum of the layers' `attention_span` (L x (W - 1) for L layers with a window of W keys,
        since each layer reaches W - 1 further back through depth). A token more than this many
        positions before t reaches t only through a memory. None: unbounded (some layer attends to
        everything, or keeps a recurrent state)."""
        spans = [layer.attention_span for layer in self.layers]
        return None if any(s is None for s in spans) else sum(spans)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> dict[str, Any]:
        types: dict[str, int] = {}
        for layer in self.layers:
            types[layer.layer_type] = types.get(layer.layer_type, 0) + 1
        return {"name": self.config.name, "parameters": self.num_parameters(), "layers": len(self.layers),
                "layer_types": types, "hidden_size": self.config.hidden_size, "vocab_size": self.config.vocab_size,
                "dtype": str(next(self.parameters()).dtype).replace("torch.", ""),
                "tie_word_embeddings": self.config.tie_word_embeddings}


def check_sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
    """One-line errors for decoding settings that would crash or mean nothing."""
    import math

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise NewLLMError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if do_sample and not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise NewLLMError(f"temperature must be a finite number > 0 when sampling, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise NewLLMError(f"top_k must be an integer >= 1 (or unset), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise NewLLMError(f"top_p must be in (0, 1] (or unset), got {top_p!r}")


def check_loss_args(labels, targets, logits_to_keep: int, loss_chunk: int | None) -> None:
    """The one-line errors of a forward's loss arguments (labels / targets / logits_to_keep / loss_chunk)."""
    if labels is not None and targets is not None:
        raise NewLLMError("forward: give labels= (the inputs' own ids, shifted inside) or targets= (each position's "
                          "next token), not both")
    if logits_to_keep and (labels is not None or targets is not None):
        raise NewLLMError("forward: labels= / targets= need every position; they cannot go with logits_to_keep")
    if loss_chunk is not None and (isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk <= 0):
        raise NewLLMError(f"forward: loss_chunk must be a positive int or None, got {loss_chunk!r}")


def head_loss(h: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, loss_chunk: int | None) -> torch.Tensor:
    """Mean CE of lm_head(h) (B, T, V) against aligned targets (B, T), by chunks of positions, without
    the whole logits (`newllm.models.ops.loss`)."""
    if targets.shape != h.shape[:2]:
        raise NewLLMError(f"forward: targets {tuple(targets.shape)} must be (batch, tokens) = {tuple(h.shape[:2])}")
    if lm_head.bias is not None:
        raise NewLLMError("forward: targets= computes the loss from the LM head's weight alone; this head has a bias")
    rows = h.shape[0] * h.shape[1]
    return linear_cross_entropy(h, lm_head.weight, targets, rows if loss_chunk is None else loss_chunk)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at position t score labels[t + 1]; -100 is ignored.
    Labels that leave nothing to score (all -100, or a single position) are an error, never a
    silent NaN loss."""
    target = labels[:, 1:]
    if target.numel() == 0 or not bool((target != -100).any()):
        raise NewLLMError(f"labels {tuple(labels.shape)} leave no token to score (every label after the first is "
                          "-100, or there is only one position); a loss over nothing would be NaN")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100)


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
