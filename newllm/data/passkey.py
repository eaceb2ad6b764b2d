"""Passkey retrieval prompts (for any LM) and their scorer; associative recall is in `newllm.data.recall`.

**Passkey retrieval** (Mohtashami & Jaggi 2023, "Landmark attention"; Munkhdalai et al. 2024,
"Infini-attention"). A prompt is

    INTRO  FILLER ... FILLER  NEEDLE  FILLER ... FILLER  QUESTION

    INTRO    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize
             them. I will quiz you about the important information there."
    FILLER   " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    NEEDLE   " The pass key is N. Remember it. N is the pass key."
    QUESTION " What is the pass key? The pass key is"

and the right continuation is " N" (N: a random integer of `digits` digits, no leading zero).

Exact lengths: each piece (the intro, each filler *sentence*, the needle, the question) is tokenized
on its own and the ids are concatenated. Every piece but the intro starts with a space, so for
byte-level BPE tokenizers (GPT-NeoX, SmolLM2) the result is the tokenization of the joined text, and
in any case decoding gives the joined text. So the prompt length is known without re-tokenizing, and
the needle's token position is known exactly.

Length and depth: the filler is repeated in whole units (5 sentences each), as many as fit, so a prompt
has at most `length` tokens and at least `length - unit + 1` (unit = the filler unit's token count,
19 for GPT-NeoX). The needle goes after ``round(depth * n_sentences)`` filler sentences: depth 0 is
right after the intro, depth 1 right before the question, always at a sentence boundary.

Distance (`make_passkey_at_distance`, for memory tests): the needle ends exactly `distance` tokens
before the prompt's last token (the one that predicts the answer's first token), so every token of
the needle is at least `distance` positions back from every answer position; place it beyond a
model's receptive field (`TransformerLM.receptive_field`) and only a memory can bring the key back.
The filler is then cut at a token, not a sentence (the text stays the same filler, one sentence
cut short): `lead` filler tokens between the intro and the needle, `distance - len(question)`
after it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from newllm.errors import NewLLMError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER_SENTENCES = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
                    " There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeySample:
    """One passkey prompt.

    ids: the prompt's token ids (ends with "The pass key is"); passkey: the digits to retrieve;
    length: the requested length (``len(ids) <= length``); depth: the requested depth (0..1);
    key_position: index in `ids` of the needle's first token (" The" of " The pass key is N.");
    distance: for `make_passkey_at_distance`, tokens from the needle's last token to the prompt's last
    token (None for the length x depth prompts).
    """
    ids: list[int]
    passkey: str
    length: int
    depth: float
    key_position: int
    distance: int | None = None


def _rng(rng) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def make_passkey_sample(tokenizer, length: int, depth: float, rng: random.Random | int | str,
                        digits: int = 5) -> PasskeySample:
    """A prompt of at most `length` tokens (within one filler unit of it) with the needle at `depth`.

    rng: a `random.Random` (consumed: one draw for the key) or a seed for one.
    """
    if digits < 1:
        raise NewLLMError(f"passkey: digits must be >= 1, got {digits}")
    if not 0.0 <= depth <= 1.0:
        raise NewLLMError(f"passkey: depth must be in [0, 1], got {depth}")
    key = str(_rng(rng).randint(10 ** (digits - 1), 10 ** digits - 1))
    intro, question = tokenizer.encode(INTRO), tokenizer.encode(QUESTION)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    sentences = [tokenizer.encode(s) for s in FILLER_SENTENCES]
    unit = sum(len(s) for s in sentences)
    fixed = len(intro) + len(needle) + len(question)
    if length < fixed:
        raise NewLLMError(f"passkey: length {length} is shorter than the prompt without filler ({fixed} tokens)")
    n_units = (length - fixed) // unit
    filler = [s for _ in range(n_units) for s in sentences]
    cut = round(depth * len(filler))
    before = [t for s in filler[:cut] for t in s]
    after = [t for s in filler[cut:] for t in s]
    ids = intro + before + needle + after + question
    return PasskeySample(ids=ids, passkey=key, length=length, depth=float(depth),
                         key_position=len(intro) + len(before))


def filler_tokens(tokenizer, n: int) -> list[int]:
    """The first `n` tokens of the filler sentences repeated (whole sentences tokenized one by one)."""
    unit = [t for s in FILLER_SENTENCES for t in tokenizer.encode(s)]
    return (unit * (n // len(unit) + 1))[:n]


def make_passkey_at_distance(tokenizer, distance: int, rng: random.Random | int | str, digits: int = 5,
                             lead: int = 0) -> PasskeySample:
    """INTRO, `lead` filler tokens, the NEEDLE, filler, QUESTION, with the needle's last token exactly
    `distance` tokens before the prompt's last token (module doc). rng: as `make_passkey_sample`."""
    if digits < 1:
        raise NewLLMError(f"passkey: digits must be >= 1, got {digits}")
    if lead < 0:
        raise NewLLMError(f"passkey: lead must be >= 0, got {lead}")
    key = str(_rng(rng).randint(10 ** (digits - 1), 10 ** digits - 1))
    intro, question = tokenizer.encode(INTRO), tokenizer.encode(QUESTION)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    if distance < len(question):
        raise NewLLMError(f"passkey: distance {distance} is shorter than the question ({len(question)} tokens)")
    after = filler_tokens(tokenizer, distance - len(question))
    ids = intro + filler_tokens(tokenizer, lead) + needle + after + question
    return PasskeySample(ids=ids, passkey=key, length=len(ids), depth=lead / max(lead + len(after), 1),
                         key_position=len(intro) + lead, distance=distance)


def make_passkey_grid(tokenizer, lengths: list[int], depths: list[float], n_per_cell: int, seed: int,
                      digits: int = 5) -> list[PasskeySample]:
    """`n_per_cell` samples for every (length, depth), in order length-major, then depth, then sample.

    One `random.Random(seed)` draws all keys in that order, so the same seed gives identical prompts.
    """
    if n_per_cell < 1:
        raise NewLLMError(f"passkey: n_per_cell must be >= 1, got {n_per_cell}")
    if not lengths or not depths:
        raise NewLLMError("passkey: lengths and depths must not be empty")
    rng = random.Random(seed)
    return [make_passkey_sample(tokenizer, L, d, rng, digits)
            for L in lengths for d in depths for _ in range(n_per_cell)]


def score_passkey(generated_text: str, passkey: str) -> bool:
    """Right iff the first run of digits in the generated text is exactly the passkey.

    " 71432." is right for 71432; " 7143", " 714325" and text without digits are wrong.
    """
    run = []
    for ch in generated_text:
        if ch.isdigit() and ch.isascii():
            run.append(ch)
        elif run:
            break
    return bool(run) and "".join(run) == passkey
