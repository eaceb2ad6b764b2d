"""train_bpe: a byte-level BPE tokenizer on real text, EOS = <|endoftext|>, lossless round trips."""
from __future__ import annotations

import pytest

from newllm import NewLLMError
from newllm.data.bpe import train_bpe
from newllm.data.corpora import load_documents


@pytest.fixture(scope="module")
def shakespeare(shared_dir):
    return load_documents("tinyshakespeare", "valid", data_dir=shared_dir)


@pytest.fixture(scope="module")
def tok(shakespeare):
    return train_bpe(shakespeare, vocab_size=600)


def test_vocabulary_and_eos(tok):
    assert tok.vocab_size == 600
    assert tok.eos_token_id == 0 and tok.backend.id_to_token(0) == "<|endoftext|>"
    assert tok.encode("<|endoftext|>") == [0]  # the special token is matched whole


def test_round_trip_and_compression(tok, shakespeare):
    text = shakespeare[0][:5000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # merges learned from the text compress it
    odd = "naïve café — 東京 \t\n emoji 🙂 and <unk>"
    assert tok.decode(tok.encode(odd)) == odd  # unseen characters fall back to bytes, nothing is lost


def test_deterministic(tok, shakespeare):
    again = train_bpe(shakespeare, vocab_size=600)
    assert again.fingerprint() == tok.fingerprint()


def test_min_frequency_can_stop_short():
    tok = train_bpe(["abab abab abab xyz"], vocab_size=1000, min_frequency=3)
    assert 257 < tok.vocab_size < 300


def test_bad_input():
    with pytest.raises(NewLLMError, match="vocab_size=100 is smaller than the 256 byte symbols"):
        train_bpe(["text"], vocab_size=100)
    with pytest.raises(NewLLMError, match="no text"):
        train_bpe([], vocab_size=300)
    with pytest.raises(NewLLMError, match="text 1 is bytes"):
        train_bpe(["ok", b"bytes"], vocab_size=300)
    with pytest.raises(NewLLMError, match="min_frequency"):
        train_bpe(["ok"], vocab_size=300, min_frequency=0)
