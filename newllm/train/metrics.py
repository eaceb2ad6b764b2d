"""Run metrics: `metrics.jsonl` (one JSON object per line), TensorBoard events, a loss-curve PNG.

Every record has `kind` ("train", "eval", "final") and `step`. On resume, records after the
checkpoint's step are dropped first (they belong to the lost future), so the file reads as one run.
TensorBoard is optional: when `torch.utils.tensorboard` cannot be imported, a note is printed and
the JSONL file and the PNG are still written.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss.png"
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                if resume_step is not None and rec.get("step", 0) <= resume_step and rec.get("kind") != "final":
                    kept.append(rec)
            self.records = kept
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError as e:
                print(f"note: TensorBoard events not written ({e}); metrics.jsonl and loss.png still are")

    def log(self, kind: str, step: int, **values) -> None:
        rec = {"kind": kind, "step": step, **values}
        self.records.append(rec)
        self.file.write(json.dumps(rec) + "\n")
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

        train = [(r["step"], r["loss"]) for r in self.records if r["kind"] == "train" and "loss" in r]
        evals = [(r["step"], math.log(r["token_ppl"])) for r in self.records
                 if r["kind"] == "eval" and r.get("token_ppl")]
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
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
