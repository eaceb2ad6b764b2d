"""A newllm `Tokenizer` (tokenizer.json or a GGUF vocabulary) as a transformers `PreTrainedTokenizerFast`.

The Rust tokenizer is copied as it is (`tokenizers.Tokenizer`), so `hf_tokenizer(tok).encode(text,
add_special_tokens=False)` equals `tok.backend.encode(text, add_special_tokens=False).ids`; the BOS and
EOS tokens are the newllm tokenizer's (for a GGUF file, its `tokenizer.ggml.bos/eos_token_id`). No
BOS is added by `encode` (the backend has no post-processor), which is what lm-evaluation-harness
and `newllm.eval.rolling` both rely on.
"""
from __future__ import annotations

from newllm.data.tokenizer import Tokenizer
from newllm.errors import NewLLMError


def hf_tokenizer(tok: Tokenizer):
    """`PreTrainedTokenizerFast` over a copy of `tok`'s backend (module doc)."""
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tok, Tokenizer):
        raise NewLLMError(f"hf_tokenizer: expected a newllm Tokenizer (newllm.load_tokenizer), got {type(tok).__name__}")
    backend = RustTokenizer.from_str(tok.backend.to_str())
    names = {}
    for key, tid in (("bos_token", tok.bos_token_id), ("eos_token", tok.eos_token_id)):
        if tid is not None:
            token = backend.id_to_token(tid)
            if token is None:
                raise NewLLMError(f"hf_tokenizer: {key} id {tid} is not in the vocabulary of {tok.name}")
            names[key] = token
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **names)
