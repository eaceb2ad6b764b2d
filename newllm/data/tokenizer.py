"""Tokenizers: one small wrapper over the `tokenizers` library, whatever the source.

`from_tokenizer_json(path)` reads a `tokenizer.json` file (or a folder holding one). The vocabulary
embedded in a `.gguf` file is rebuilt by `newllm.checkpoints.gguf_tokenizer`; `newllm.load_tokenizer(path)`
picks between the two. Every source ends up as a `tokenizers.Tokenizer`, so encoding is the Rust
implementation everywhere.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from newllm.errors import NewLLMError


class Tokenizer:
    """encode(text) -> list[int], decode(ids) -> str, plus vocab_size / eos_token_id / name."""

    def __init__(self, backend: HFTokenizer, name: str, eos_token: str | None = None,
                 bos_token_id: int | None = None, add_bos: bool = False):
        self.backend = backend
        self.name = name
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stop_token_ids(self, eos_token_id: int | None = None) -> list[int]:
        """Ids that end a generation: `eos_token_id` (the model's), the tokenizer's EOS, and every
        end-of-turn token of its vocabulary (`STOP_TOKENS`: `<|im_end|>`, `<|eot_id|>`, ...)."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        ids = [eos_token_id, self.eos_token_id, *(vocab.get(t) for t in STOP_TOKENS)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def fingerprint(self) -> str:
        """Hash of the full tokenizer definition (for keying token caches)."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def save(self, path) -> None:
        self.backend.save(str(path))


EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>")
#: end-of-text and end-of-turn tokens of common chat vocabularies (ChatML, Llama 3, Gemma, ...)
STOP_TOKENS = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>",
               "<|end|>")


def from_tokenizer_json(path) -> Tokenizer:
    """A `Tokenizer` from a `tokenizer.json` file or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").exists():
            raise NewLLMError(f"{path}: folder has no tokenizer.json")
        path = path / "tokenizer.json"
    elif not path.exists():
        raise NewLLMError(f"{path}: no such tokenizer file or folder")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises its own exception type
        raise NewLLMError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
    return Tokenizer(backend, name=f"{path.parent.name}/{path.name}", eos_token=eos)
