"""Tokenizers: one small wrapper over the `tokenizers` library, whatever the source.

`load_tokenizer(path)` accepts a folder holding `tokenizer.json`, a `tokenizer.json` file, or a
`.gguf` file (its embedded vocabulary). Every source ends up as a `tokenizers.Tokenizer`, so
encoding is the Rust implementation everywhere.
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

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> str:
        """Hash of the full tokenizer definition (for keying token caches)."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def save(self, path) -> None:
        self.backend.save(str(path))


EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>")


def from_tokenizer_json(path) -> Tokenizer:
    path = Path(path)
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises its own exception type
        raise NewLLMError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
    return Tokenizer(backend, name=f"{path.parent.name}/{path.name}", eos_token=eos)


def load_tokenizer(path) -> Tokenizer:
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").exists():
            raise NewLLMError(f"{p}: folder has no tokenizer.json")
        return from_tokenizer_json(p / "tokenizer.json")
    if not p.exists():
        raise NewLLMError(f"{p}: no such tokenizer file or folder")
    if p.suffix == ".gguf":
        from newllm.checkpoints.gguf import tokenizer_from_gguf

        return tokenizer_from_gguf(p)
    return from_tokenizer_json(p)


# ---------------------------------------------------------------- GGUF vocabularies
# A GGUF file carries no tokenizer.json: llama.cpp stores the vocabulary, merges and token types
# as metadata and names the pre-tokenizer (`tokenizer.ggml.pre`), whose split rules live in
# llama.cpp's source (llama-vocab.cpp). We rebuild those rules here for the byte-level BPE
# ("gpt2") vocabularies; the file is read by `newllm.checkpoints.gguf.tokenizer_from_gguf`.

_GPT2_SPLIT = None  # ByteLevel's own regex: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: `tokenizer.ggml.pre` -> (split digits one by one first?, split regex or None for GPT-2's)
GGUF_PRE_TOKENIZERS = {
    "gpt-2": (False, _GPT2_SPLIT), "gpt2": (False, _GPT2_SPLIT),
    # llama.cpp: "\p{N}" first, then the GPT-2 regex (SmolLM's tokenizer.json: Digits + ByteLevel)
    **{name: (True, _GPT2_SPLIT) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell")},
    **{name: (False, _LLAMA3_SPLIT) for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")},
    **{name: (False, _QWEN2_SPLIT) for name in ("qwen2", "deepseek-r1-qwen")},
}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4  # llama.cpp's llama_token_type


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table: bytes that print as themselves keep their
    code point; the other 68 (controls, space, ...) get 256, 257, ... in byte order (space -> 'Ġ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def from_gguf_vocab(model: str, pre: str, tokens: list[str], merges: list[str], token_types: list[int] | None,
                    bos_token_id: int | None, eos_token_id: int | None, add_bos: bool, name: str,
                    where: str) -> Tokenizer:
    """A byte-level BPE `Tokenizer` from GGUF vocabulary metadata.

    tokens[i] is the byte-level spelling (GPT-2's bytes-to-unicode alphabet) of token i; merges are
    "left right" pairs, best first. CONTROL tokens (`<|im_start|>`...) become special added tokens
    and USER_DEFINED ones plain added tokens, so both are matched whole in text, as in llama.cpp.
    `where` (the file) goes into error messages.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    if model != "gpt2":
        raise NewLLMError(f"{where}: GGUF tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level BPE)")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise NewLLMError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported "
                          f"(supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))})")
    byte_chars = _byte_level_chars()
    alphabet = set(byte_chars)
    vocab = {}
    for i, tok in enumerate(tokens):
        # a token written outside the byte alphabet (e.g. with a real space) is respelled from its UTF-8 bytes
        vocab.setdefault(tok if set(tok) <= alphabet else "".join(byte_chars[b] for b in tok.encode("utf-8")), i)
    pairs = []
    for k, merge in enumerate(merges):
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise NewLLMError(f"{where}: tokenizer.ggml.merges[{k}] = {merge!r} is not a 'left right' pair")
        pairs.append(pair)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    digits, split = GGUF_PRE_TOKENIZERS[pre]
    if split is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    types = list(token_types or [])
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
    for label, tid in (("bos", bos_token_id), ("eos", eos_token_id)):
        if tid is not None and not 0 <= tid < len(tokens):
            raise NewLLMError(f"{where}: {label} token id {tid} is outside the vocabulary of {len(tokens)} tokens")
    eos = tokens[eos_token_id] if eos_token_id is not None else None
    return Tokenizer(backend, name=name, eos_token=eos, bos_token_id=bos_token_id, add_bos=add_bos)
