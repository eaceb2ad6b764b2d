"""The tokenizer embedded in a GGUF file, rebuilt as a `newllm` `Tokenizer`.

    tok = tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

A GGUF file carries no tokenizer.json: llama.cpp stores the vocabulary, merges and token types
as metadata (`tokenizer.ggml.*`) and names the pre-tokenizer (`tokenizer.ggml.pre`), whose split
rules live in llama.cpp's source (llama-vocab.cpp). We rebuild those rules here for the byte-level
BPE ("gpt2") vocabularies: `tokenizer_from_gguf(path)` reads the metadata, `from_gguf_vocab(...)`
builds the `tokenizers.Tokenizer` from it.
"""
from __future__ import annotations

from pathlib import Path

from gguf import Keys
from tokenizers import Tokenizer as HFTokenizer

from newllm.checkpoints.gguf import field, open_gguf
from newllm.data.tokenizer import Tokenizer
from newllm.errors import NewLLMError

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


def tokenizer_from_gguf(path) -> Tokenizer:
    """The tokenizer embedded in a GGUF file (`tokenizer.ggml.*`), as a `newllm` `Tokenizer`."""
    reader = open_gguf(path)
    tokens = field(reader, Keys.Tokenizer.LIST, path)
    bos = field(reader, Keys.Tokenizer.BOS_ID, path, None)
    eos = field(reader, Keys.Tokenizer.EOS_ID, path, None)
    return from_gguf_vocab(
        model=field(reader, Keys.Tokenizer.MODEL, path),
        pre=field(reader, Keys.Tokenizer.PRE, path, "default"),
        tokens=tokens,
        merges=field(reader, Keys.Tokenizer.MERGES, path, []),
        token_types=field(reader, Keys.Tokenizer.TOKEN_TYPE, path, None),
        bos_token_id=bos, eos_token_id=eos,
        add_bos=bool(field(reader, Keys.Tokenizer.ADD_BOS, path, False)),
        name=Path(path).name, where=str(path),
    )
