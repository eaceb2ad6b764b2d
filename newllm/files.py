"""Safe file handling: the one place newllm writes files, checks outputs and resolves paths read from files.

Promises (docs/reliability.md):

* `atomic_write(path, write)` writes through a temporary file in the same folder and renames it
  into place (`os.replace`), so a kill or a full disk leaves the old file or the new one, never a
  half-written one; the temporary file is removed on any failure. It never replaces a directory,
  a device, a socket, a symbolic link or any other non-regular file.
* `check_output(path, force)` is what a command calls on each output it was given before doing any
  work: an existing file is refused unless `force` (nothing a user made is replaced unasked), a
  non-regular file always, and a missing folder is named.
* `contained(base, name, where)` resolves a path read from a file (a shard name, a checkpoint
  pointer) and refuses one that leaves `base`: absolute paths, `..`, symbolic links pointing out.
* `dumps_json(obj)` writes valid JSON: NaN and infinities become null, and a top-level mapping
  gains `"nonfinite": {key: "nan" | "inf" | "-inf"}` naming what was replaced.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable

from newllm.errors import NewLLMError


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_non_regular(path: Path) -> bool:
    """True when `path` exists (as a regular file); raises when it exists and is anything else."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a parent is a file (check_output names it)
        return False
    if not stat.S_ISREG(st.st_mode):
        raise NewLLMError(f"{path}: exists and is {_kind(st.st_mode)}; newllm never replaces that with a file")
    return True


def check_output(path, force: bool = False, flag: str = "--force") -> Path:
    """Check an output file before any work (module doc); returns it as a Path."""
    p = Path(path)
    exists = _refuse_non_regular(p)
    if exists and not force:
        raise NewLLMError(f"{p}: already exists; pass {flag} to replace it")
    if not p.parent.is_dir():
        raise NewLLMError(f"{p}: folder {p.parent} does not exist" if not p.parent.exists()
                          else f"{p}: {p.parent} is not a folder")
    return p


def check_output_dir(path, names, force: bool = False, flag: str = "--force") -> Path:
    """Check an output folder that will receive the files `names`: it may be new or an existing
    folder, but files of those names in it are replaced only with `force`."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise NewLLMError(f"{p}: exists and is not a folder")
        taken = [n for n in names if (p / n).exists() or (p / n).is_symlink()]
        for n in taken:
            _refuse_non_regular(p / n)
        if taken and not force:
            raise NewLLMError(f"{p}: already holds {', '.join(taken)}; pass {flag} to replace them")
    return p


def atomic_write(path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it over `path` (module doc)."""
    p = Path(path)
    _refuse_non_regular(p)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _refuse_non_regular(p)  # again: it may have appeared while we wrote
        os.replace(tmp, p)
    except OSError as e:  # a full disk, a read-only folder: name the file the user asked for, not our temporary
        raise OSError(e.errno, e.strerror or str(e), str(p)) from e
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    return p


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path, obj, indent: int = 2) -> Path:
    return write_text(path, dumps_json(obj, indent=indent) + "\n")


def _clean(x, path: str, found: dict[str, str]):
    if isinstance(x, float) and not math.isfinite(x):
        found[path or "value"] = "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
        return None
    if isinstance(x, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), found) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v, f"{path}[{i}]", found) for i, v in enumerate(x)]
    return x


def json_safe(obj) -> tuple[Any, dict[str, str]]:
    """(obj with every non-finite float replaced by None, {dotted key: "nan" | "inf" | "-inf"})."""
    found: dict[str, str] = {}
    return _clean(obj, "", found), found


def dumps_json(obj, indent: int | None = 2) -> str:
    """Valid JSON (never a bare NaN): non-finite floats become null, and a top-level mapping gets
    "nonfinite" naming each one (module doc)."""
    clean, found = json_safe(obj)
    if found and isinstance(clean, dict):
        clean["nonfinite"] = found
    return json.dumps(clean, indent=indent, allow_nan=False, default=str)


def contained(base, name, where: str) -> Path:
    """`base / name` for a `name` read from the file `where`, refused unless it stays inside `base`."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise NewLLMError(f"{where}: path {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise NewLLMError(f"{where}: path {name!r} leaves {base} (absolute or '..'); refused")
    target = Path(base) / rel
    root = Path(base).resolve()
    resolved = target.resolve()
    if resolved != root and root not in resolved.parents:
        raise NewLLMError(f"{where}: path {name!r} resolves to {resolved}, outside {root}; refused")
    return target


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True
