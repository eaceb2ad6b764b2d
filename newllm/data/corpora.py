"""Real text corpora: find them, split them into documents, tokenize them once and cache the ids.

Layout of a data directory (``../shared`` beside the checkout by default, see `find_data_dir`)::

    data/wikitext-2/wiki.{train,valid,test}.tokens    WikiText-2 (word-level "tokens" version)
    data/tinyshakespeare/input.txt                    tiny-shakespeare, one text
    data/gutenberg/*.txt                              Project Gutenberg books, old headers included

Named corpora and how they are cut into documents and splits:

* ``wikitext-2``: the three official split files. A document is one article: it starts at a
  top-level heading line `` = Title = `` that stands between blank lines (this rule finds exactly
  600 / 60 / 60 articles in train / valid / test; the between-blank-lines condition stops equation
  lines such as `` = 1 <unk> / s and a nominal <unk> k = `` inside an article from counting).
  Documents are the file's text cut at those lines, so their concatenation is the file minus its
  leading blank lines (nothing is re-spaced or dropped).
* ``tinyshakespeare``: one document. Split by characters, 90 / 5 / 5 % for train / valid / test,
  each cut moved forward to the next line break so that no line is split.
* ``gutenberg``: one document per book, sorted by file name, with the Project Gutenberg header and
  trailer removed (`strip_gutenberg`), read as UTF-8 or else ISO-8859-1 (two old files are). Every
  book is split by characters like tiny-shakespeare, so every split holds every book (same authors
  and styles in train and test, long documents in all).
* any other text file or folder of ``.txt`` files: one document per file, split like gutenberg.
  ``split="all"`` returns a corpus whole (all three splits of WikiText-2).
* ``hf:<dataset>/<config>`` (e.g. ``hf:wikitext/wikitext-2-raw-v1``): a Hugging Face dataset through
  the optional ``datasets`` package (``pip install newllm[hf]``); needs internet the first time.

`load_tokens` joins the documents' token ids with one separator token between documents (never
padding; the seeds padded short texts to length and 94 % of their training tokens were EOS) and
caches the result as a ``.npy`` file, memory-mapped on later calls.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

from newllm.errors import NewLLMError

SPLITS = ("train", "valid", "test")
ALL = "all"
#: fractions of each document's characters that go to train / valid / test (the rest is test)
CHAR_SPLIT = (0.90, 0.05)
#: named corpora -> (folder under <data_dir>/data, description)
KNOWN = {
    "wikitext-2": ("wikitext-2", "WikiText-2 articles (wiki.{train,valid,test}.tokens)"),
    "tinyshakespeare": ("tinyshakespeare", "tiny-shakespeare (input.txt), one document, 90/5/5 by characters"),
    "gutenberg": ("gutenberg", "Project Gutenberg books (*.txt), one document per book, 90/5/5 by characters"),
}
ENV_DATA_DIR = "NEWLLM_DATA_DIR"
ENV_CACHE_DIR = "NEWLLM_CACHE_DIR"
SEPARATOR_TOKEN = "<|endoftext|>"
CACHE_VERSION = 1  # bump when the document rules or the cache format change

_HEADING = re.compile(r" = [^=].* = ")


# ---------------------------------------------------------------------------- data directory
def default_data_dir() -> Path:
    """``../shared`` beside the checkout: the folder holding the repo that holds this package."""
    return Path(__file__).resolve().parents[2].parent / "shared"


def find_data_dir(explicit=None) -> Path:
    """The data directory: `explicit` (``--data-dir``) > $NEWLLM_DATA_DIR > ``../shared`` beside the checkout.

    A directory given explicitly (flag or variable) must exist: a typo is not silently replaced by
    the default. When nothing is found the error lists every place looked at and how to set one.
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir():
            return p
        raise NewLLMError(f"data directory {p} (given by --data-dir / data_dir=) does not exist")
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            return p
        raise NewLLMError(f"data directory {p} (from ${ENV_DATA_DIR}) does not exist")
    p = default_data_dir()
    if p.is_dir():
        return p
    raise NewLLMError(f"no data directory found: looked at --data-dir (not given), ${ENV_DATA_DIR} (not set), "
                      f"{p} (missing); pass --data-dir DIR or set {ENV_DATA_DIR}=DIR")


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "newllm"


# ---------------------------------------------------------------------------- text rules
def read_text(path: Path, fallback: str | None = None) -> str:
    """UTF-8 text; `fallback` (e.g. "latin-1") for files that are not UTF-8, else a one-line error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        if fallback:
            return path.read_bytes().decode(fallback)
        raise NewLLMError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise NewLLMError(f"{path}: cannot read ({e.strerror})") from None


def split_wikitext_articles(text: str) -> list[str]:
    """WikiText articles: cut before every `` = Title = `` line that stands between blank lines.

    Text before the first heading is kept as a document only if it is not blank.
    """
    lines = text.splitlines(keepends=True)
    blank = [not line.strip() for line in lines]
    starts = [i for i, line in enumerate(lines)
              if _HEADING.fullmatch(line.rstrip("\r\n")) and (i == 0 or blank[i - 1])
              and (i + 1 == len(lines) or blank[i + 1])]
    bounds = [0, *[s for s in starts if s > 0], len(lines)]
    docs = ["".join(lines[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [d for d in docs if d.strip()]


_GUTENBERG_START = re.compile(r"^\*+ ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*? ?THE SMALL PRINT.*$",
                              re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*+ ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                            re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The book without Project Gutenberg's header and trailer.

    The header ends at the first ``*END*THE SMALL PRINT...`` (old files) or ``*** START OF THE
    PROJECT GUTENBERG EBOOK ...`` line; the trailer starts at the first ``End of [the] Project
    Gutenberg ...`` or ``*** END OF THE PROJECT GUTENBERG EBOOK ...`` line after it. Text without the
    markers is returned unchanged (stripped of surrounding blank space).
    """
    start = _GUTENBERG_START.search(text)
    begin = start.end() if start else 0
    end = _GUTENBERG_END.search(text, begin)
    body = text[begin:end.start() if end else len(text)].replace("\x1a", "")  # DOS end-of-file marks
    return body.strip("\n\r ") + "\n"


def char_split(text: str, split: str) -> str:
    """The train / valid / test part of one text by characters (`CHAR_SPLIT`), cut at line breaks."""
    def cut(frac: float) -> int:
        i = int(len(text) * frac)
        nl = text.find("\n", max(i - 1, 0))  # a cut already at a line start stays there
        return len(text) if nl < 0 else nl + 1

    a, b = cut(CHAR_SPLIT[0]), cut(CHAR_SPLIT[0] + CHAR_SPLIT[1])
    return {"train": text[:a], "valid": text[a:b], "test": text[b:], ALL: text}[split]


# ---------------------------------------------------------------------------- sources
def _check_split(split: str, where: str) -> None:
    if split not in (*SPLITS, ALL):
        raise NewLLMError(f"{where}: unknown split {split!r} (choose from {', '.join((*SPLITS, ALL))})")


def _corpus_dir(name: str, data_dir) -> Path:
    folder = find_data_dir(data_dir) / "data" / KNOWN[name][0]
    if not folder.is_dir():
        raise NewLLMError(f"corpus {name!r}: folder {folder} is missing (expected the layout of ASSETS.md: "
                          f"<data_dir>/data/{KNOWN[name][0]}/)")
    return folder


def source_files(name_or_path, split: str = "train", data_dir=None) -> list[Path]:
    """The files a corpus split is read from (what the token cache is keyed on)."""
    name = str(name_or_path)
    _check_split(split, name)
    if name.startswith("hf:"):
        return []
    if name in KNOWN:
        folder = _corpus_dir(name, data_dir)
        if name == "wikitext-2":
            files = [folder / f"wiki.{s}.tokens" for s in (SPLITS if split == ALL else (split,))]
        elif name == "tinyshakespeare":
            files = [folder / "input.txt"]
        else:
            files = sorted(folder.glob("*.txt"))
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise NewLLMError(f"corpus {name!r}: missing file(s) {', '.join(missing)}")
        if not files:
            raise NewLLMError(f"corpus {name!r}: no .txt files in {folder}")
        return files
    p = Path(name).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise NewLLMError(f"{p}: folder holds no .txt files")
        return files
    raise NewLLMError(f"unknown corpus {name!r}: not a known name ({', '.join(KNOWN)}), not an existing file or "
                      "folder, and not hf:<dataset>/<config>")


def load_documents(name_or_path, split: str = "train", data_dir=None) -> list[str]:
    """The documents of one split of a corpus (see the module docstring for the rules)."""
    name = str(name_or_path)
    if name.startswith("hf:"):
        _check_split(split, name)
        docs = _load_hf(name[3:], split)
    else:
        files = source_files(name, split, data_dir)
        if name == "wikitext-2":
            docs = [d for f in files for d in split_wikitext_articles(read_text(f))]
        elif name == "gutenberg":
            # two of the old files are ISO-8859-1 (Project Gutenberg's encoding before UTF-8)
            docs = [char_split(strip_gutenberg(read_text(f, "latin-1")), split) for f in files]
        else:  # tinyshakespeare, a user's file or folder: one document per file
            docs = [char_split(read_text(f), split) for f in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise NewLLMError(f"corpus {name!r} split {split!r} is empty (no non-blank text)")
    return docs


def _load_hf(spec: str, split: str) -> list[str]:
    """``<dataset>/<config>`` from the Hugging Face hub; rows of column "text"."""
    try:
        import datasets
    except ImportError:
        raise NewLLMError(f"hf:{spec} needs the optional 'datasets' package: pip install 'newllm[hf]'") from None
    path, _, config = spec.partition("/")
    hf_split = {"valid": "validation", ALL: "train+validation+test"}.get(split, split)
    try:
        rows = datasets.load_dataset(path, config or None, split=hf_split)["text"]
    except Exception as e:  # network, unknown dataset, no "text" column: all one line for the user
        raise NewLLMError(f"hf:{spec}: cannot load split {hf_split!r} ({str(e).splitlines()[0]})") from None
    if path == "wikitext":  # one row per line: rebuild the text, then cut into articles
        return split_wikitext_articles("".join(r if r.endswith("\n") else r + "\n" for r in rows))
    return list(rows)


# ---------------------------------------------------------------------------- tokens
def separator_id(tokenizer) -> int:
    """The token put between documents: ``<|endoftext|>`` when the vocabulary has it (the document
    separator GPT-NeoX, SmolLM2 and our own BPE were trained with; an instruct model's EOS is its
    end-of-turn token, wrong between documents), else the tokenizer's EOS."""
    sep = tokenizer.backend.token_to_id(SEPARATOR_TOKEN) if hasattr(tokenizer, "backend") else None
    if sep is None:
        sep = tokenizer.eos_token_id
    if sep is None:
        raise NewLLMError(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} has no {SEPARATOR_TOKEN} or EOS token "
                          "to put between documents")
    return int(sep)


def _cache_key(name: str, split: str, files: list[Path], tokenizer, sep: int) -> str:
    stats = []
    for f in files:
        st = f.stat()
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": CACHE_VERSION, "corpus": name, "split": split, "files": stats,
                       "tokenizer": tokenizer.fingerprint(), "sep": sep}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(name_or_path, split: str, tokenizer, data_dir=None, cache_dir=None) -> Path:
    """Where `load_tokens` keeps (or will keep) the ids of this corpus split and tokenizer."""
    name = str(name_or_path)
    files = source_files(name, split, data_dir)
    key = _cache_key(name, split, files, tokenizer, separator_id(tokenizer))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name if not name.startswith("hf:") else name)[:60]
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / f"{stem}-{split}-{key}.npy"


def load_tokens(name_or_path, split: str, tokenizer, data_dir=None, cache_dir=None) -> np.ndarray:
    """All token ids of a corpus split, 1-D int32: documents joined with one separator between them.

    The ids are cached in ``cache_dir`` (default $NEWLLM_CACHE_DIR or ~/.cache/newllm) under a key of
    the corpus, split, its files' paths / sizes / mtimes, the tokenizer's fingerprint and the
    separator, written atomically (temporary file + rename), and memory-mapped read-only on every
    call. A changed file or tokenizer makes a new key; an unreadable cache file is rebuilt.
    """
    path = cache_path(name_or_path, split, tokenizer, data_dir, cache_dir)
    folder, fname = path.parent, path.name
    if path.is_file():
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.ndim == 1 and arr.dtype == np.int32 and arr.size > 0:
                return arr
        except (ValueError, OSError):
            pass  # truncated or foreign file: rebuild it below
    docs = load_documents(name_or_path, split, data_dir)
    sep = separator_id(tokenizer)
    if tokenizer.vocab_size > np.iinfo(np.int32).max:
        raise NewLLMError(f"tokenizer vocabulary of {tokenizer.vocab_size} does not fit int32 token ids")
    encoded = tokenizer.encode_batch(docs)
    parts = []
    for i, ids in enumerate(encoded):
        if i:
            parts.append(np.array([sep], dtype=np.int32))
        parts.append(np.asarray(ids, dtype=np.int32))
    tokens = np.concatenate(parts)
    if tokens.size == 0:
        raise NewLLMError(f"corpus {name_or_path!r} split {split!r} tokenizes to no tokens")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=fname + ".", suffix=".tmp", dir=folder)
    except OSError as e:  # a read-only or full cache folder: the ids are still right, only not kept
        warnings.warn(f"token cache {folder}: cannot write ({e.strerror or e}); continuing without caching",
                      RuntimeWarning, stacklevel=2)
        return tokens
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, tokens)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"token cache {path}: cannot write ({e.strerror or e}); continuing without caching",
                      RuntimeWarning, stacklevel=2)
        return tokens
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="r")


def scored_text(tokens, tokenizer, sep: int) -> str:
    """The text `tokens` stand for: the documents between `sep` tokens decoded one by one (the
    separators dropped), one per line.

    Byte-level BPE decodes losslessly, so for a whole split this is the documents themselves; for a
    prefix of a split it is the text that prefix covers (its words and bytes give word perplexity and
    bits per byte, `newllm.eval.perplexity`).
    """
    arr = np.asarray(tokens)
    cuts = np.flatnonzero(arr == sep).tolist()
    starts, ends = [0, *(c + 1 for c in cuts)], [*cuts, len(arr)]
    docs = [tokenizer.decode(arr[a:b].tolist()) for a, b in zip(starts, ends)]
    return "\n".join(d for d in docs if d)
