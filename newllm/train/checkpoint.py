"""Training checkpoints: everything needed to continue a run as if it had never stopped.

Layout of a run folder::

    RUN_DIR/checkpoints/step-000500/   a newllm model folder (model.safetensors + newllm.json)
                                       plus trainer.pt (optimizer, scaler, schedule position,
                                       RNG states, data position, config)
    RUN_DIR/checkpoints/latest         the name of the newest complete checkpoint folder

    RUN_DIR/checkpoints/step-000500/checksums.json   sha256 of every file of the folder

A checkpoint folder is written under a temporary name and renamed into place (os.replace), then
`latest` is rewritten the same way, so a crash leaves either the old or the new checkpoint, never a
half-written one; a failed write (a full disk) removes its temporary folder, and temporaries left by
a killed process are removed by the next save. Weights are safetensors; `trainer.pt` holds only
tensors, dicts, lists, numbers and strings and is read with `torch.load(weights_only=True)` (no
pickle code runs from a foreign file). Reading a checkpoint checks every file against
`checksums.json` first, so a flipped bit fails loudly instead of resuming with wrong numbers.
`latest` must name a `step-N` folder beside it (a pointer such as `../../other/step-1` is refused),
and a checkpoint continues in the run folder that holds it (`run_dir_of`).
Every checkpoint folder is also a loadable model (`newllm eval ppl --model .../step-000500`).
This is the single-process format; a run on several processes (torchrun) writes the DCP layout of
newllm/train/distributed.py, which reuses the pieces here (checksums, `latest`, temporaries).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from newllm.errors import NewLLMError
from newllm.files import contained, pid_alive, write_text

FORMAT = "newllm-train-state"
VERSION = 2  # 2: checksums.json beside the files
STATE_FILE = "trainer.pt"
CHECKSUMS = "checksums.json"
CHECKED_FILES = ("model.safetensors", "newllm.json", STATE_FILE)
STEP_NAME = re.compile(r"^step-\d+$")
_TEMP = re.compile(r"^\.(tmp-step-\d+|latest)-(\d+)$")


def rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as weights_only-loadable objects."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_temporaries(ckpt_root: Path) -> None:
    """Delete `.tmp-step-N-PID` folders and `.latest-PID` files whose process is gone (a kill or a
    full disk left them; they hold space a resumed run needs)."""
    for p in ckpt_root.iterdir() if ckpt_root.is_dir() else ():
        m = _TEMP.match(p.name)
        if m and (int(m.group(2)) == os.getpid() or not pid_alive(int(m.group(2)))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def save_checkpoint(ckpt_root: Path, step: int, model, state: dict[str, Any], keep: int) -> Path:
    """Write `ckpt_root/step-N` (model + trainer state + checksums) atomically and point `latest` at it.
    (A distributed run writes its own folder layout: newllm/train/distributed.py.)"""
    from newllm.checkpoints.native import save_model

    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(ckpt_root)
    name = f"step-{step:07d}"
    final = ckpt_root / name
    if not final.exists():
        tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
        try:
            save_model(model, tmp, metadata={"step": step, "tokens": state.get("tokens")})
            torch.save({"format": FORMAT, "version": VERSION, **state}, tmp / STATE_FILE)
            write_checksums(tmp, CHECKED_FILES)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    point_latest(ckpt_root, name, keep)
    return final


def write_checksums(folder: Path, files) -> None:
    """`folder/checksums.json`: the sha256 of each of `files` (paths relative to `folder`)."""
    sums = {f: sha256_file(folder / f) for f in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")


def point_latest(ckpt_root: Path, name: str, keep: int) -> None:
    """Rewrite `latest` to name the complete checkpoint folder `name`; keep the newest `keep` folders."""
    write_text(ckpt_root / "latest", name + "\n")
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name != name)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path) -> Path:
    """The checkpoint folder meant by `path`: a run folder, a checkpoint folder, or its trainer.pt."""
    p = Path(path)
    if p.is_file():
        return p.parent if p.name == STATE_FILE else _bad(p, f"not a training checkpoint (expected {STATE_FILE} "
                                                              "or a run folder)")
    if not p.exists():
        raise NewLLMError(f"{p}: no such run folder or checkpoint")
    if (p / STATE_FILE).exists():
        return p
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not STEP_NAME.match(name):
            raise NewLLMError(f"{latest}: names {name[:80]!r}, not a checkpoint folder step-N beside it; refused")
        folder = contained(p / "checkpoints", name, str(latest))
        if not (folder / STATE_FILE).exists():
            raise NewLLMError(f"{latest}: points at {folder.name}, which has no {STATE_FILE}")
        return folder
    raise NewLLMError(f"{p}: neither a run folder (no checkpoints/latest) nor a checkpoint folder (no {STATE_FILE})")


def _bad(p: Path, why: str):
    raise NewLLMError(f"{p}: {why}")


def owning_run(folder: Path) -> Path | None:
    """RUN_DIR for a checkpoint folder RUN_DIR/checkpoints/step-N; None for one moved out of its run."""
    folder = Path(folder)
    if folder.parent.name != "checkpoints" or not STEP_NAME.match(folder.name):
        return None
    return folder.parent.parent


def run_dir_of(folder: Path) -> Path:
    """The run folder a checkpoint folder belongs to (`owning_run`). A checkpoint folder moved out of
    its run has none (its grandparent is not a run): refused, so a resume never writes config,
    tokenizer and metrics somewhere unrelated."""
    folder = Path(folder)
    if owning_run(folder) is None:
        raise NewLLMError(f"{folder}: not inside a run folder (RUN_DIR/checkpoints/step-N); move it back into its "
                          "run, or say where the run continues with --set run_dir=DIR")
    return owning_run(folder)


def read_checksums(folder: Path, name: str) -> dict[str, str]:
    """`folder/checksums.json` (written by save_checkpoint); `name` is the file being verified, for messages."""
    sums_file, f = folder / CHECKSUMS, folder / name
    try:
        sums = json.loads(sums_file.read_text())
    except FileNotFoundError:
        raise NewLLMError(f"{f}: cannot be verified, {CHECKSUMS} is missing beside it (not a checkpoint newllm "
                          "wrote, or a damaged one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NewLLMError(f"{f}: cannot be verified, {sums_file} is not valid JSON ({e})") from None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise NewLLMError(f"{f}: cannot be verified, {sums_file} is not a mapping of file names to checksums")
    return sums


def verify_checksums(folder: Path, name: str) -> None:
    """Check `folder/name` against `folder/checksums.json` (written by save_checkpoint)."""
    sums = read_checksums(folder, name)
    if name not in sums:
        raise NewLLMError(f"{folder / name}: cannot be verified, {folder / CHECKSUMS} has no checksum for it")
    if not (folder / name).is_file():
        raise NewLLMError(f"{folder / name}: missing")
    if sha256_file(folder / name) != sums[name]:
        raise NewLLMError(f"{folder / name}: sha256 check failed: the file changed or was damaged after the "
                          "checkpoint was written")


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """Read and check `folder/trainer.pt`; any unreadable or foreign file is a one-line NewLLMError."""
    f = folder / STATE_FILE
    if not f.is_file():
        raise NewLLMError(f"{f}: missing")
    version = _peek_version(f)
    if version is not None and version != VERSION:
        raise NewLLMError(f"{f}: training-checkpoint version {version} is not supported (expected {VERSION})")
    verify_checksums(folder, STATE_FILE)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NewLLMError(f"{f}: missing") from None
    except Exception as e:  # pickle / zip / unpickler errors come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise NewLLMError(f"{f}: not a readable training checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise NewLLMError(f"{f}: not a newllm training checkpoint (format {found!r}, expected {FORMAT!r})")
    if state.get("version") != VERSION:
        raise NewLLMError(f"{f}: training-checkpoint version {state.get('version')} is not supported (expected {VERSION})")
    required = {"config", "data", "step", "tokens", "model_fingerprint"}
    if "distributed" not in state:  # a distributed checkpoint keeps these in dcp/ and its rank files
        required |= {"optimizer", "rng"}
    missing = sorted(required - set(state))
    if missing:
        raise NewLLMError(f"{f}: training checkpoint lacks {missing}")
    return state


def load_weights(model, folder: Path) -> None:
    """Copy the checkpoint's safetensors weights into `model` (names and shapes checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from newllm.checkpoints.native import load_state_dict_strict

    f = folder / "model.safetensors"
    verify_checksums(folder, f.name)
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise NewLLMError(f"{f}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors.get("embed.weight")
    load_state_dict_strict(model, tensors, str(f))


def _peek_version(f: Path) -> int | None:
    """The version of a checkpoint without verifying it (so an old one says "version 1", not "no
    checksums"); None when it cannot be read (the checksum check then names the problem)."""
    if (f.parent / CHECKSUMS).exists():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return state.get("version") if isinstance(state, dict) and state.get("format") == FORMAT else None
