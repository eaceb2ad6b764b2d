"""Train a byte-level BPE tokenizer on our own text (the `tokenizers` library does the work).

Byte-level (GPT-2 style): text is UTF-8 bytes mapped to printable characters, so every string
encodes with no unknown token and ``decode(encode(s)) == s``. Pre-tokenization is GPT-2's regex
(words with their leading space, numbers, punctuation runs, whitespace). The special tokens come
first in the vocabulary (``<|endoftext|>`` = id 0, the EOS and document separator), then the 256
byte symbols, then merges in the order learned.
"""
from __future__ import annotations

from typing import Iterable

from newllm.data.tokenizer import Tokenizer
from newllm.errors import NewLLMError

EOS_TOKEN = "<|endoftext|>"
N_BYTES = 256


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              special_tokens: tuple[str, ...] | list[str] = (EOS_TOKEN,)) -> Tokenizer:
    """A byte-level BPE `Tokenizer` of at most `vocab_size` tokens learned from `texts`.

    `min_frequency`: a pair must occur this often to be merged, so the vocabulary can stop short of
    `vocab_size` on a small corpus. EOS is ``<|endoftext|>`` (added to `special_tokens` if missing).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special = list(dict.fromkeys([*special_tokens, EOS_TOKEN]))
    if vocab_size < N_BYTES + len(special):
        raise NewLLMError(f"train_bpe: vocab_size={vocab_size} is smaller than the {N_BYTES} byte symbols "
                          f"plus {len(special)} special token(s)")
    if min_frequency < 1:
        raise NewLLMError(f"train_bpe: min_frequency must be >= 1, got {min_frequency}")
    if isinstance(texts, str):
        texts = [texts]
    seen = {"chars": 0}

    def counted():
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise NewLLMError(f"train_bpe: text {i} is {type(t).__name__}, not str")
            seen["chars"] += len(t)
            yield t

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(counted(), trainer=trainer)
    if seen["chars"] == 0:
        raise NewLLMError("train_bpe: no text to train on (empty input)")
    return Tokenizer(backend, name=f"bpe-{backend.get_vocab_size()}", eos_token=EOS_TOKEN)
