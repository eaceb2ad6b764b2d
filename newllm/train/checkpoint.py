"""Training checkpoints: everything needed to continue a run as if it had never stopped.

Layout of a run folder::

    RUN_DIR/checkpoints/step-000500/   a newllm model folder (model.safetensors + newllm.json)
                                       plus trainer.pt (optimizer, scaler, schedule position,
                                       RNG states, data position, config)
    RUN_DIR/checkpoints/latest         the name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name and renamed into place (os.replace), then
`latest` is rewritten the same way, so a crash leaves either the old or the new checkpoint, never a
half-written one. Weights are safetensors; `trainer.pt` holds only tensors, dicts, lists, numbers and
strings and is read with `torch.load(weights_only=True)` (no pickle code runs from a foreign file).
Every checkpoint folder is also a loadable model (`newllm eval ppl --model .../step-000500`).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from newllm.errors import NewLLMError

FORMAT = "newllm-train-state"
VERSION = 1
STATE_FILE = "trainer.pt"


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


def save_checkpoint(ckpt_root: Path, step: int, model, state: dict[str, Any], keep: int) -> Path:
    """Write `ckpt_root/step-N` (model + trainer state) atomically and point `latest` at it."""
    from newllm.checkpoints.native import save_model

    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = ckpt_root / name
    if not final.exists():
        tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp, metadata={"step": step, "tokens": state.get("tokens")})
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp / STATE_FILE)
        os.replace(tmp, final)
    pointer_tmp = ckpt_root / f".latest-{os.getpid()}"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, ckpt_root / "latest")
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name != name)
    for p in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


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
        folder = p / "checkpoints" / latest.read_text().strip()
        if not (folder / STATE_FILE).exists():
            raise NewLLMError(f"{latest}: points at {folder.name}, which has no {STATE_FILE}")
        return folder
    raise NewLLMError(f"{p}: neither a run folder (no checkpoints/latest) nor a checkpoint folder (no {STATE_FILE})")


def _bad(p: Path, why: str):
    raise NewLLMError(f"{p}: {why}")


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """Read and check `folder/trainer.pt`; any unreadable or foreign file is a one-line NewLLMError."""
    f = folder / STATE_FILE
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
    missing = sorted({"config", "optimizer", "rng", "data", "step", "tokens", "model_fingerprint"} - set(state))
    if missing:
        raise NewLLMError(f"{f}: training checkpoint lacks {missing}")
    return state


def load_weights(model, folder: Path) -> None:
    """Copy the checkpoint's safetensors weights into `model` (names and shapes checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from newllm.checkpoints.native import load_state_dict_strict

    f = folder / "model.safetensors"
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise NewLLMError(f"{f}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors.get("embed.weight")
    load_state_dict_strict(model, tensors, str(f))
