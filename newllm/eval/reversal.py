"""The Reversal Curse evaluation: does a model that learned "A is B" also know "B is A"?

Two families of metrics, both on the model in eval mode under no_grad, every example scored on its
own (from an empty memory: a held memory is set aside and put back), preceded by the document
separator ``separator_id(tokenizer)`` as every document is in training:

* the seed's metric, sentence perplexity: ``forward_ppl`` on the sentences in the trained direction
  (the `trained` examples when given: sentences that were in the training text; else `forward`),
  ``backward_ppl`` on the reversed sentences (`reverse`), ``gap = backward_ppl - forward_ppl``
  (closer to 0 is better), and ``forward_heldout_ppl`` on `forward`. A perplexity is
  exp(total NLL / total tokens) over every token of every sentence (the separator is not scored).
  A sentence is tokenised whole, ``encode(prompt + completion)``, as the training text is.
* the paper's metrics, forward vs reverse: greedy-completion accuracy and the log-probability of the
  completion given the prompt (sum over its tokens; mean over examples, and per token = total over
  total tokens). Prompt and completion are encoded separately and concatenated, so the prompt's
  tokens are exactly those of the prompt alone, as the model sees it when asked to complete it
  (encoding the whole sentence could merge the prompt's last characters with the completion's first).
  A completion is correct when the greedy continuation (decoded, stripped, lower-cased) starts with
  the target (stripped, lower-cased, trailing ``.!?,;:`` removed) and the next character, if any, is
  not a letter or digit: "Daphne Barringtonson" does not count as "Daphne Barrington".

Scoring batches examples sorted by length, right-padded (the models are causal, so padding after a
sequence changes none of its logits; padded positions are not scored). Greedy decoding batches only
prompts of equal token length (the models take no attention mask) and re-runs the whole sequence
for each new token: prompts are short, and this needs nothing from the model but its forward call.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from newllm.data.corpora import separator_id
from newllm.data.reversal import Example
from newllm.errors import NewLLMError

#: trailing characters dropped from a target before the startswith comparison
TARGET_TRAILING = ".!?,;:"


@dataclass
class ReversalResult:
    forward_accuracy: float  # greedy completion correct, name -> description (held-out paraphrases)
    reverse_accuracy: float  # description -> name
    forward_logprob: float  # mean over examples of sum log p(completion | prompt), nats
    reverse_logprob: float
    forward_logprob_per_token: float  # total log-prob / total completion tokens
    reverse_logprob_per_token: float
    forward_ppl: float  # seed metric: sentences in the trained direction (`trained`, else `forward`)
    backward_ppl: float  # reversed sentences
    gap: float  # backward_ppl - forward_ppl
    forward_heldout_ppl: float  # `forward` sentences
    n_forward: int
    n_reverse: int
    n_trained: int  # sentences behind forward_ppl when `trained` was given, else 0
    forward_correct: list[bool] = field(default_factory=list)
    reverse_correct: list[bool] = field(default_factory=list)
    forward_logprobs: list[float] = field(default_factory=list)
    reverse_logprobs: list[float] = field(default_factory=list)
    forward_generations: list[str] = field(default_factory=list)  # decoded greedy continuations
    reverse_generations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"accuracy forward {self.forward_accuracy:.3f} reverse {self.reverse_accuracy:.3f} | "
                f"logprob forward {self.forward_logprob:.3f} reverse {self.reverse_logprob:.3f} | "
                f"ppl forward {self.forward_ppl:.3f} backward {self.backward_ppl:.3f} gap {self.gap:+.3f}")


def is_correct(generated: str, target: str) -> bool:
    """The startswith rule of the module doc (case-insensitive, target's trailing punctuation dropped)."""
    gen = generated.strip().lower()
    tgt = target.strip().lower().rstrip(TARGET_TRAILING).rstrip()
    if not gen.startswith(tgt):
        return False
    rest = gen[len(tgt):]
    return not rest or not rest[0].isalnum()


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


@torch.no_grad()
def score_tokens(model, seqs: list[list[int]], starts: list[int], batch_size: int = 16,
                 progress: bool = False, desc: str = "scoring") -> list[tuple[float, int]]:
    """(log-prob sum, token count) of ``seq[start:]`` given ``seq[:start]``, for each sequence.

    Sequences are sorted by length and run `batch_size` at a time, right-padded with their own first
    token; a padded position is never a target and, the model being causal, never a context.
    """
    if batch_size < 1:
        raise NewLLMError(f"batch_size must be >= 1, got {batch_size}")
    device, out = _device(model), [(0.0, 0)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for a in tqdm(range(0, len(order), batch_size), disable=None if progress else True, desc=desc, unit="batch"):
        rows = order[a:a + batch_size]
        width = max(len(seqs[i]) for i in rows)
        x = torch.tensor([seqs[i] + [seqs[i][0]] * (width - len(seqs[i])) for i in rows], device=device)
        logp = F.log_softmax(model(x).logits.float(), dim=-1)  # (B, T, V)
        for r, i in enumerate(rows):
            s, e = starts[i], len(seqs[i])
            if not 1 <= s <= e:
                raise NewLLMError(f"score_tokens: sequence {i}: start {s} outside 1..{e}")
            picked = logp[r, s - 1:e - 1].gather(1, x[r, s:e, None])  # (e - s, 1)
            out[i] = (float(picked.double().sum()), e - s)
    return out


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                         progress: bool = False, desc: str = "generating") -> list[list[int]]:
    """The `max_new_tokens` greedy tokens after each prompt; equal-length prompts share a batch."""
    device = _device(model)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    chunks = [idx[a:a + batch_size] for idx in groups.values() for a in range(0, len(idx), batch_size)]
    out: list[list[int]] = [[] for _ in prompts]
    for rows in tqdm(chunks, disable=None if progress else True, desc=desc, unit="batch"):
        x = torch.tensor([prompts[i] for i in rows], device=device)
        for _ in range(max_new_tokens):
            logits = model(x, logits_to_keep=1).logits  # (B, 1, V)
            x = torch.cat((x, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
        for r, i in enumerate(rows):
            out[i] = x[r, len(prompts[i]):].tolist()
    return out


def _ppl(scores: list[tuple[float, int]]) -> float:
    n = sum(c for _, c in scores)
    return math.exp(-sum(s for s, _ in scores) / n) if n else float("nan")


def reversal_eval(model, tokenizer, forward: list[Example], reverse: list[Example],
                  trained: list[Example] | None = None, max_new_tokens: int = 16, batch_size: int = 16,
                  progress: bool = False) -> ReversalResult:
    """Forward vs reverse accuracy and log-probs (the paper) and sentence perplexities (the seed)."""
    for name, exs in (("forward", forward), ("reverse", reverse), ("trained", trained)):
        if exs is not None and not exs:
            raise NewLLMError(f"reversal_eval: no {name} examples")
        for k, ex in enumerate(exs or []):
            if not tokenizer.encode(ex.completion):
                raise NewLLMError(f"reversal_eval: {name} example {k} has an empty completion")
    if max_new_tokens < 1:
        raise NewLLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sep = separator_id(tokenizer)

    def sentences(exs):
        seqs = [[sep, *tokenizer.encode(ex.text)] for ex in exs]
        return score_tokens(model, seqs, [1] * len(seqs), batch_size, progress, "sentences")

    def completions(exs):
        prompts = [[sep, *tokenizer.encode(ex.prompt)] for ex in exs]
        seqs = [p + tokenizer.encode(ex.completion) for p, ex in zip(prompts, exs)]
        scores = score_tokens(model, seqs, [len(p) for p in prompts], batch_size, progress, "completions")
        gens = [tokenizer.decode(g) for g in greedy_continuations(model, prompts, max_new_tokens, batch_size,
                                                                  progress)]
        correct = [is_correct(g, ex.completion) for g, ex in zip(gens, exs)]
        return scores, gens, correct

    with model.memory_aside(train=False), torch.no_grad():
        fwd_sent, rev_sent = sentences(forward), sentences(reverse)
        trained_sent = sentences(trained) if trained is not None else fwd_sent
        fwd, fwd_gen, fwd_ok = completions(forward)
        rev, rev_gen, rev_ok = completions(reverse)
    forward_ppl, backward_ppl = _ppl(trained_sent), _ppl(rev_sent)
    return ReversalResult(
        forward_accuracy=sum(fwd_ok) / len(fwd_ok), reverse_accuracy=sum(rev_ok) / len(rev_ok),
        forward_logprob=sum(s for s, _ in fwd) / len(fwd), reverse_logprob=sum(s for s, _ in rev) / len(rev),
        forward_logprob_per_token=sum(s for s, _ in fwd) / sum(c for _, c in fwd),
        reverse_logprob_per_token=sum(s for s, _ in rev) / sum(c for _, c in rev),
        forward_ppl=forward_ppl, backward_ppl=backward_ppl, gap=backward_ppl - forward_ppl,
        forward_heldout_ppl=_ppl(fwd_sent), n_forward=len(forward), n_reverse=len(reverse),
        n_trained=len(trained) if trained is not None else 0,
        forward_correct=fwd_ok, reverse_correct=rev_ok,
        forward_logprobs=[s for s, _ in fwd], reverse_logprobs=[s for s, _ in rev],
        forward_generations=fwd_gen, reverse_generations=rev_gen)
