"""ContextLM: a TransformerLM whose input at position t depends on its own output at t-1.

    x_t = embed(ids_t) + W_c h_{t-1}            (B, d)
    h_t = final_norm(layers(x_t | KV caches))    (B, d)   the vector the LM head reads
    logits_t = lm_head(h_t)

h_{-1} (the context of the first token) is a learned vector (`init="learned"`) or zero
(`init="zero"`).

Which hidden is fed back, and why: the output of the final norm, i.e. exactly what the LM head
reads. It is the model's "summary of everything so far" in the form the model itself uses to
predict, and its scale is fixed by the norm (LayerNorm/RMSNorm: about sqrt(d) times the norm's
gain), so a feedback loop through T tokens cannot grow without bound the way the raw residual
stream (which grows with depth) could.

Used exactly, the recurrence is sequential: token t needs h_{t-1}, which needs the whole stack at
t-1. So `model(ids)` runs token by token (one stack call per token, each carrying the per-layer KV
caches); this is the exact model, used by evaluation, generation and `update_memory`. Gradients
flow through the recurrence (`detach_every=k` truncates them every k tokens).

Lagged Cache Training (newllm/train/lct.py) instead calls `forward_lagged(ids, context)`, one
parallel pass whose context (B, T, d) is given from outside (last iteration's hidden states,
shifted by one). `forward_lagged` is never what `model(...)` does.

State (the contract of DESIGN.md section 3): `(layer_0_state, ..., layer_{N-1}_state,
FeedbackState(h))`, the per-layer KV caches followed by h_{t-1} of the last token seen, so one call
equals any split with the state carried.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from newllm.config import ModelConfig, dataclass_from_dict
from newllm.errors import NewLLMError
from newllm.models.model import (LMOutput, State, TransformerLM, check_loss_args, detach_state, expand_state, head_loss,
                                  lm_loss)

INITS = ("learned", "zero")


@dataclass
class ContextConfig:
    """Options of the h_{t-1} feedback, stored in `ModelConfig.context_feedback`."""

    init: str = "learned"  # h_{-1}: a learned vector, or zero
    # std of W_c's normal init; None: initializer_range / sqrt(d), so that W_c h_{t-1} (|h| ~ sqrt(d)
    # after the final norm) starts at the scale of a token embedding (std initializer_range)
    proj_init_std: float | None = None

    def __post_init__(self):
        if self.init not in INITS:
            raise NewLLMError(f"context_feedback: init must be one of {INITS}, got {self.init!r}")
        if self.proj_init_std is not None and self.proj_init_std < 0:
            raise NewLLMError(f"context_feedback: proj_init_std must be >= 0, got {self.proj_init_std}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "context_feedback") -> "ContextConfig":
        return dataclass_from_dict(cls, d, where)


class FeedbackState(NamedTuple):
    """The recurrent part of a ContextLM state: h (B, d), the final hidden of the last token seen."""

    h: torch.Tensor


def shift_context(h: torch.Tensor, h_init: torch.Tensor) -> torch.Tensor:
    """Context for each position from hidden states: out[:, t] = h[:, t-1], out[:, 0] = h_init.

    h: (B, T, d); h_init: (B, d). Returns (B, T, d).
    """
    return torch.cat((h_init[:, None].to(h.dtype), h[:, :-1]), dim=1)


class ContextLM(TransformerLM):
    """TransformerLM with the h_{t-1} feedback (see the module docstring)."""

    extra_state_types = (FeedbackState,)

    def __init__(self, config: ModelConfig):
        if config.context_feedback is None:
            raise NewLLMError("ContextLM: config.context_feedback is None (use TransformerLM for a plain model)")
        super().__init__(config=config)
        self.context_config = ContextConfig.from_dict(config.context_feedback)
        d = config.hidden_size
        self.context_proj = nn.Linear(d, d, bias=False)  # W_c
        std = self.context_config.proj_init_std
        nn.init.normal_(self.context_proj.weight, std=config.initializer_range / d**0.5 if std is None else std)
        if self.context_config.init == "learned":
            # start at a unit-RMS vector, the scale of a normed hidden (LayerNorm gain 1)
            self.h_init = nn.Parameter(torch.randn(d))
        else:
            self.register_buffer("h_init", torch.zeros(d), persistent=False)
        self.to(config.torch_dtype)

    @property
    def receptive_field(self) -> None:
        """Unbounded: h_{t-1} carries every earlier token."""
        return None

    # ------------------------------------------------------------------ helpers
    def initial_context(self, batch_size: int) -> torch.Tensor:
        """h_{-1} for a batch: (B, d)."""
        return self.h_init[None].expand(batch_size, -1)

    def init_state(self, batch_size: int):
        """The layers' empty states followed by FeedbackState(h_{-1})."""
        return (*super().init_state(batch_size), FeedbackState(self.initial_context(batch_size)))

    def check_state(self, state) -> None:
        """A raw state is the per-layer entries followed by one FeedbackState (used by the memory shell)."""
        if state is None:
            return
        if len(state) != len(self.layers) + 1 or not isinstance(state[-1], FeedbackState):
            raise NewLLMError(f"ContextLM state must have {len(self.layers)} layer entries followed by a "
                              f"FeedbackState, got {len(state)} entries ending in {type(state[-1]).__name__}")

    # ------------------------------------------------------------------ exact recurrence
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, state: State | None = None,
                update_memory: bool = False, output_hidden_states: bool = False, logits_to_keep: int = 0,
                targets: torch.Tensor | None = None, loss_chunk: int | None = None) -> LMOutput:
        """The exact recurrence, token by token, continuing from `state` (default: the held memory).

        The same signature as `TransformerLM.forward`. Truncated BPTT through the feedback is
        `recurrent_loss(..., detach_every=k)`, what sequential training calls.
        """
        check_loss_args(labels, targets, logits_to_keep, loss_chunk)
        h_all, new_state, hidden = self.run_recurrence(input_ids, state, None, output_hidden_states)
        if logits_to_keep:
            h_all = h_all[:, -logits_to_keep:]  # (B, k, d)
        if update_memory:
            self._memory = detach_state(new_state)
        if targets is not None:
            return LMOutput(logits=None, loss=head_loss(h_all, self.lm_head, targets, loss_chunk), state=new_state,
                            hidden_states=hidden)
        logits = self.lm_head(h_all)  # one head call for all positions (the head is not recurrent)
        return LMOutput(logits=logits, loss=_loss(logits, labels), state=new_state, hidden_states=hidden)

    def recurrent_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, detach_every: int | None = None,
                       state=None) -> torch.Tensor:
        """Mean next-token loss of the exact recurrence from `state` (default: the held memory), with
        the gradient through h cut every `detach_every` tokens (truncated BPTT through the feedback;
        the KV caches keep their gradients, as in an ordinary transformer)."""
        h_all, _, _ = self.run_recurrence(input_ids, state, detach_every)
        return _loss(self.lm_head(h_all), labels)

    def run_recurrence(self, input_ids: torch.Tensor, state=None, detach_every: int | None = None,
                       output_hidden_states: bool = False):
        """The exact recurrence without the head: (h (B, T, d), new state, per-layer outputs or None).

        `state=None` reads the held memory, as `forward` does.
        """
        self.check_ids(input_ids)
        if detach_every is not None and detach_every <= 0:
            raise NewLLMError(f"detach_every must be > 0, got {detach_every}")
        if state is None:
            state = self._memory
        self.check_state(state)
        B, T = input_ids.shape
        if T == 0:
            raise NewLLMError("input_ids has no tokens")
        if state is None:
            layer_states, h_prev = [None] * len(self.layers), self.initial_context(B)
        else:
            state = expand_state(state, B)
            layer_states, h_prev = list(state[:-1]), state[-1].h
        emb = self.embed(input_ids)  # (B, T, d), all tokens at once: only the feedback is sequential
        hs, per_layer = [], ([[] for _ in range(len(self.layers) + 1)] if output_hidden_states else None)
        for t in range(T):
            x = emb[:, t:t + 1] + self.context_proj(h_prev)[:, None]  # (B, 1, d)
            if per_layer is not None:
                per_layer[0].append(x)
            for i, layer in enumerate(self.layers):
                x, layer_states[i] = layer(x, layer_states[i])
                if per_layer is not None:
                    per_layer[i + 1].append(x)
            h = self.norm(x)  # (B, 1, d)
            hs.append(h)
            h_prev = h[:, 0]
            if detach_every is not None and (t + 1) % detach_every == 0:
                h_prev = h_prev.detach()
        hidden = [torch.cat(p, dim=1) for p in per_layer] if per_layer is not None else None
        return torch.cat(hs, dim=1), (*layer_states, FeedbackState(h_prev)), hidden

    # ------------------------------------------------------------------ lagged (parallel) pass
    def forward_lagged(self, input_ids: torch.Tensor, context: torch.Tensor, labels: torch.Tensor | None = None):
        """One parallel pass with the context given: x_t = embed(ids_t) + W_c context[:, t].

        input_ids: (B, T), context: (B, T, d) where context[:, t] stands for h_{t-1}
        (use `shift_context`). Windows start from an empty state, like `model(ids)` with no state.
        Returns (LMOutput, h) with h (B, T, d) the new final hidden states (with their graph).
        """
        self.check_ids(input_ids)
        B, T = input_ids.shape
        if context.shape != (B, T, self.config.hidden_size):
            raise NewLLMError(f"forward_lagged: context has shape {tuple(context.shape)}, expected "
                              f"{(B, T, self.config.hidden_size)} for input_ids {(B, T)}")
        x = self.embed(input_ids) + self.context_proj(context.to(self.embed.weight.dtype))
        for layer in self.layers:
            x, _ = layer(x, None)
        h = self.norm(x)
        logits = self.lm_head(h)
        return LMOutput(logits=logits, loss=_loss(logits, labels)), h

    def jacobi_hidden(self, input_ids: torch.Tensor, h: torch.Tensor | None, sweeps: int) -> torch.Tensor:
        """`sweeps` parallel passes of h <- F(shift(h)) under no_grad, from `h` (zeros if None).

        The recurrence is causal, so each sweep makes at least one more leading position exact:
        after j sweeps positions 0..j-1 equal the exact recurrence, after T sweeps all do.
        """
        B, T = input_ids.shape
        if h is None:
            h = torch.zeros(B, T, self.config.hidden_size, dtype=self.embed.weight.dtype, device=input_ids.device)
        with torch.no_grad():
            for _ in range(sweeps):
                _, h = self.forward_lagged(input_ids, shift_context(h, self.initial_context(B)))
        return h


def build_model(config: ModelConfig) -> TransformerLM:
    """The model class a config asks for: ContextLM when it has `context_feedback`, else TransformerLM."""
    if config.context_feedback is not None:
        return ContextLM(config)
    return TransformerLM(config=config)


def _loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    return None if labels is None else lm_loss(logits, labels)
