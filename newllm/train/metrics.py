"""Run metrics: `metrics.jsonl` (one JSON object per line), TensorBoard events, a loss-curve PNG.

Every record has `kind` ("train", "eval", "final") and `step`. On resume, records after the
checkpoint's step are dropped first (they belong to the lost future), so the file reads as one run.
A last line cut short by a kill mid-write is dropped with a warning; a damaged line elsewhere is a
one-line error naming file:line. Every line is valid JSON: a NaN or Inf value is written as null
(`newllm.files.json_safe`).
TensorBoard is optional: when `torch.utils.tensorboard` cannot be imported, a note is printed and
the JSONL file and the PNG are still written.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from newllm.errors import NewLLMError
from newllm.files import atomic_write, json_safe, write_text


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a partial last line (a kill mid-write) is dropped with a warning."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if all(not rest.strip() for rest in lines[n:]):  # the last line: cut short by a kill
                warnings.warn(f"{path}:{n}: dropped a partial last line (the run was killed while writing it)",
                              RuntimeWarning, stacklevel=2)
                break
            raise NewLLMError(f"{path}:{n}: not a JSON object ({e}); the metrics file is damaged") from None
        records.append(rec)
    return records


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss.png"
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            kept = [json_safe(rec)[0] for rec in read_records(self.path)
                    if resume_step is not None and _step(rec) <= resume_step and rec.get("kind") != "final"]
            self.records = kept
            write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError as e:
                print(f"note: TensorBoard events not written ({e}); metrics.jsonl and loss.png still are")

    def log(self, kind: str, step: int, **values) -> None:
        rec, _ = json_safe({"kind": kind, "step": step, **values})
        self.records.append(rec)
        self.file.write(json.dumps(rec, allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{key}", v, step)

    def plot(self) -> None:
        """Training loss (and validation loss, log of token PPL) against step, to loss.png."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if r.get("kind") == "train" and r.get("loss") is not None]
        evals = [(r["step"], math.log(r["token_ppl"])) for r in self.records
                 if r.get("kind") == "eval" and r.get("token_ppl")]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), lw=1, label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="valid loss (log token PPL)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step(rec: dict[str, Any]) -> int:
    step = rec.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else 0
