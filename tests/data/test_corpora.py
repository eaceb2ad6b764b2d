"""Corpora on the real files in the data directory: documents, splits, EOS joins, the token cache,
and one-line errors for unknown names, empty corpora and missing directories."""
from __future__ import annotations

import os

import numpy as np
import pytest

from newllm import NewLLMError
from newllm.data import corpora
from newllm.data.corpora import find_data_dir, load_documents, load_tokens, separator_id, split_wikitext_articles
from newllm.data.tokenizer import from_tokenizer_json
from tests.conftest import NEOX_TOKENIZER, ROOT


@pytest.fixture(scope="module")
def neox():
    return from_tokenizer_json(NEOX_TOKENIZER)


# ------------------------------------------------------------------------------ data directory
def test_find_data_dir_order(tmp_path, monkeypatch):
    other, default = tmp_path / "other", tmp_path / "default"
    other.mkdir()
    default.mkdir()
    monkeypatch.setattr(corpora, "default_data_dir", lambda: default)
    monkeypatch.setenv("NEWLLM_DATA_DIR", str(other))
    assert find_data_dir(tmp_path) == tmp_path  # explicit beats the environment
    assert find_data_dir() == other  # the environment beats the default
    monkeypatch.delenv("NEWLLM_DATA_DIR")
    assert find_data_dir() == default
    monkeypatch.undo()
    assert corpora.default_data_dir() == ROOT.parent / "shared"  # ../shared beside the checkout


def test_find_data_dir_errors_say_where(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(NewLLMError, match=f"{missing}.*--data-dir"):
        find_data_dir(missing)
    monkeypatch.setenv("NEWLLM_DATA_DIR", str(missing))
    with pytest.raises(NewLLMError, match=f"{missing}.*NEWLLM_DATA_DIR"):
        find_data_dir()
    monkeypatch.delenv("NEWLLM_DATA_DIR")
    monkeypatch.setattr(corpora, "default_data_dir", lambda: missing)
    with pytest.raises(NewLLMError) as e:
        find_data_dir()
    msg = str(e.value)
    assert "--data-dir" in msg and "NEWLLM_DATA_DIR" in msg and str(missing) in msg and "\n" not in msg


def test_named_corpus_in_missing_data_dir(tmp_path):
    with pytest.raises(NewLLMError, match="wikitext-2.*missing"):
        load_documents("wikitext-2", "valid", data_dir=tmp_path)


# ------------------------------------------------------------------------------ WikiText-2
def test_wikitext_valid_articles(shared_dir):
    docs = load_documents("wikitext-2", "valid", data_dir=shared_dir)
    assert len(docs) == 60
    assert docs[0].startswith(" = Homarus gammarus = \n")
    assert docs[1].startswith(" = Frank <unk> = \n")
    raw = (shared_dir / "data/wikitext-2/wiki.valid.tokens").read_text(encoding="utf-8")
    assert raw.startswith(" \n") and "".join(docs) == raw[2:]  # lossless: only the leading blank line goes


@pytest.mark.parametrize("split,count", [("test", 60), ("train", 600)])
def test_wikitext_article_counts(shared_dir, split, count):
    docs = load_documents("wikitext-2", split, data_dir=shared_dir)
    assert len(docs) == count
    assert all(d.startswith(" = ") and not d.startswith(" = = ") for d in docs)


def test_wikitext_equation_line_is_not_a_heading(shared_dir):
    docs = load_documents("wikitext-2", "test", data_dir=shared_dir)
    eq = " = 1 <unk> / s and a nominal <unk> k = \n"
    (doc,) = [d for d in docs if eq in d]
    assert doc.startswith(" = Constant k filter = \n")


def test_split_wikitext_articles_rule():
    text = " \n = A = \n \n a = b = c \n = x = \n \n = = Sub = = \n \n = B = \n \n text \n"
    docs = split_wikitext_articles(text)
    assert [d.splitlines()[0] for d in docs] == [" = A = ", " = B = "]
    assert "".join(docs) == text[2:]


# ------------------------------------------------------------------------------ tiny-shakespeare, Gutenberg
def test_tinyshakespeare_split(shared_dir):
    raw = (shared_dir / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")
    parts = [load_documents("tinyshakespeare", s, data_dir=shared_dir) for s in ("train", "valid", "test")]
    assert [len(p) for p in parts] == [1, 1, 1]
    train, valid, test = (p[0] for p in parts)
    assert train + valid + test == raw
    assert train.endswith("\n") and valid.endswith("\n")  # cut at line breaks
    assert abs(len(train) / len(raw) - 0.90) < 1e-3 and abs(len(valid) / len(raw) - 0.05) < 1e-3
    assert load_documents("tinyshakespeare", "all", data_dir=shared_dir) == [raw]


def test_gutenberg_books(shared_dir):
    books = sorted((shared_dir / "data/gutenberg").glob("*.txt"))
    docs = {s: load_documents("gutenberg", s, data_dir=shared_dir) for s in ("train", "valid", "test", "all")}
    assert all(len(d) == len(books) for d in docs.values())  # one document per book in every split
    for whole, a, b, c in zip(docs["all"], docs["train"], docs["valid"], docs["test"]):
        assert a + b + c == whole
    joined = "".join(docs["all"])
    for marker in ("SMALL PRINT", "End of The Project Gutenberg", "END OF THE PROJECT GUTENBERG", "\x1a"):
        assert marker not in joined
    ball = docs["all"][[p.name for p in books].index("chesterton-ball.txt")]
    assert "Brunetière" in ball  # an ISO-8859-1 file, decoded as such
    emma = docs["all"][0]
    assert emma.startswith("VOLUME I") and emma.rstrip().endswith("FINIS")


# ------------------------------------------------------------------------------ user files, errors
def test_user_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n" * 40)
    (tmp_path / "a.txt").write_text("first file\n" * 40)
    (tmp_path / "skip.md").write_text("not text\n")
    docs = load_documents(tmp_path, "all")
    assert docs == ["first file\n" * 40, "second file\n" * 40]  # sorted by name, .txt only
    train = load_documents(tmp_path / "a.txt", "train")
    assert train == ["first file\n" * 36]


def test_unknown_corpus_lists_known_names():
    with pytest.raises(NewLLMError) as e:
        load_documents("wikitext-103", "test")
    assert all(name in str(e.value) for name in ("wikitext-2", "tinyshakespeare", "gutenberg"))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(NewLLMError, match="empty"):
        load_documents(tmp_path / "empty.txt", "all")
    (tmp_path / "dir").mkdir()
    with pytest.raises(NewLLMError, match="no .txt files"):
        load_documents(tmp_path / "dir", "all")


def test_bad_split_and_bad_encoding(tmp_path):
    with pytest.raises(NewLLMError, match="unknown split 'validation'"):
        load_documents("wikitext-2", "validation")
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(NewLLMError, match="bin.txt: not UTF-8 text \\(byte 3"):
        load_documents(tmp_path / "bin.txt", "all")


def test_hf_without_datasets(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(NewLLMError, match=r"hf:wikitext/wikitext-2-raw-v1 needs .*datasets.*pip install"):
        load_documents("hf:wikitext/wikitext-2-raw-v1", "test")


# ------------------------------------------------------------------------------ tokens and cache
def test_tokens_joined_with_eos_no_padding(tmp_path, neox):
    texts = ["Hello world!\n", "A second document.\n", "Third one, the last.\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    tokens = load_tokens(tmp_path, "all", neox, cache_dir=tmp_path / "cache")
    eos = separator_id(neox)
    assert eos == neox.eos_token_id == 0
    expected = neox.encode(texts[0]) + [eos] + neox.encode(texts[1]) + [eos] + neox.encode(texts[2])
    assert tokens.dtype == np.int32 and tokens.ndim == 1
    assert tokens.tolist() == expected  # EOS only between documents, nothing before, after or as filler
    assert neox.encode("Hello world!") == [12092, 1533, 2]


def test_wikitext_tokens_have_one_eos_between_articles(shared_dir, neox, tmp_path):
    tokens = load_tokens("wikitext-2", "valid", neox, data_dir=shared_dir, cache_dir=tmp_path)
    docs = load_documents("wikitext-2", "valid", data_dir=shared_dir)
    assert int((tokens == neox.eos_token_id).sum()) == len(docs) - 1
    assert tokens[0] != neox.eos_token_id and tokens[-1] != neox.eos_token_id
    assert len(tokens) == sum(len(ids) for ids in neox.encode_batch(docs)) + len(docs) - 1


def test_cache_reused_then_invalidated(tmp_path, neox, monkeypatch):
    data = tmp_path / "corpus.txt"
    data.write_text("the cache should be read, not rebuilt\n" * 20)
    cache = tmp_path / "cache"
    first = load_tokens(data, "all", neox, cache_dir=cache)
    (path,) = cache.glob("*.npy")
    mtime = path.stat().st_mtime_ns
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temporary file

    def fail(*a, **k):
        raise AssertionError("documents were read again: the cache was not used")

    monkeypatch.setattr(corpora, "load_documents", fail)
    second = load_tokens(data, "all", neox, cache_dir=cache)
    assert isinstance(second, np.memmap) and second.tolist() == first.tolist()
    assert path.stat().st_mtime_ns == mtime
    monkeypatch.undo()

    data.write_text("changed text, changed size\n" * 20)  # a new size and mtime make a new key
    third = load_tokens(data, "all", neox, cache_dir=cache)
    assert third.tolist() == np.asarray(neox.encode("changed text, changed size\n" * 20)).tolist()
    assert len(list(cache.glob("*.npy"))) == 2


def test_corrupt_cache_is_rebuilt(tmp_path, neox):
    data = tmp_path / "corpus.txt"
    data.write_text("some text to cache\n" * 5)
    first = load_tokens(data, "all", neox, cache_dir=tmp_path / "c").tolist()
    (path,) = (tmp_path / "c").glob("*.npy")
    path.write_bytes(b"garbage")
    assert load_tokens(data, "all", neox, cache_dir=tmp_path / "c").tolist() == first


def test_cache_dir_from_environment(tmp_path, neox, monkeypatch):
    monkeypatch.setenv("NEWLLM_CACHE_DIR", str(tmp_path / "envcache"))
    data = tmp_path / "corpus.txt"
    data.write_text("cached where the environment says\n")
    load_tokens(data, "all", neox)
    assert len(list((tmp_path / "envcache").glob("*.npy"))) == 1


def test_tokenizer_without_separator(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from newllm.data.tokenizer import Tokenizer

    tok = Tokenizer(HFTokenizer(models.BPE()), name="bare")
    (tmp_path / "c.txt").write_text("x\n")
    with pytest.raises(NewLLMError, match="'bare' has no <\\|endoftext\\|> or EOS"):
        load_tokens(tmp_path / "c.txt", "all", tok, cache_dir=tmp_path)


def test_cache_files_are_readonly_memmaps(tmp_path, neox):
    data = tmp_path / "corpus.txt"
    data.write_text("memory mapped\n")
    tokens = load_tokens(data, "all", neox, cache_dir=tmp_path / "c")
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
    assert os.path.getsize(next((tmp_path / "c").glob("*.npy"))) > 0
