"""Run metrics: `metrics.jsonl` (one JSON object per line), TensorBoard events, a loss-curve PNG.

Every record has `kind` ("train", "eval", "final") and `step`. On resume, records after the
checkpoint's step are dropped first (they belong to the lost future), so the file reads as one run.
A last line cut short by a kill mid-write is dropped with a warning; a damaged line elsewhere is a
one-line error naming file:line. Every line is valid JSON: a NaN or Inf value is written as null
(`newllm.files.json_safe`).
TensorBoard is optional: when `torch.utils.tensorboard` cannot be imported, a note is printed and
the JSONL file and the PNG are still written.

Weights & Biases is a third, optional backend (`wandb:` in the recipe, `WandbConfig`): `wandb` is
imported only when it is enabled, the run's files go to RUN_DIR/wandb/, and every record is logged
at its step as `KIND/KEY` (`KIND/SPLIT/KEY` for a record with a split: `final/test/token_ppl`). The
run id is kept in the trainer's checkpoints; a resume passes it back (`wandb.init(id=..., resume=
"allow")`), so the resumed run continues the same W&B run. Records between the checkpoint and a
kill were already sent; W&B keeps the first copy of a step and warns about the repeat (the resumed
run recomputes the same values: resume is exact).

Under torchrun only rank 0 writes (`write=True`); the other ranks keep their records in memory.
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


def require_backends(cfg) -> None:
    """Fail before any work when the recipe asks for a backend that is not installed."""
    import importlib.util

    if cfg.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise NewLLMError(WANDB_MISSING)


WANDB_MISSING = ("wandb.enabled: the wandb package is not installed (pip install 'newllm[wandb]'), or set "
                 "wandb.enabled=false")


class MetricsLog:
    """`write=False` (a rank other than 0): records are kept in memory only, nothing is written."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True, wandb=None,
                 wandb_run_id: str | None = None, config: dict[str, Any] | None = None, write: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss.png"
        self.records: list[dict[str, Any]] = []
        self.write = write
        self.file = self.tb = self.wandb = None
        self.wandb_run_id = wandb_run_id
        if not write:
            return
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
        if wandb is not None:
            self.wandb = start_wandb(wandb, run_dir, wandb_run_id, config)
            self.wandb_run_id = self.wandb.id

    def log(self, kind: str, step: int, **values) -> None:
        rec, _ = json_safe({"kind": kind, "step": step, **values})
        self.records.append(rec)
        if not self.write:
            return
        self.file.write(json.dumps(rec, allow_nan=False) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for key, v in numbers.items():
                self.tb.add_scalar(f"{kind}/{key}", v, step)
        if self.wandb is not None:
            prefix = f"{kind}/{values['split']}" if isinstance(values.get("split"), str) else kind
            self.wandb.log({f"{prefix}/{k}": v for k, v in numbers.items()}, step=step)


    def plot(self) -> None:
        """Training loss (and validation loss, log of token PPL) against step, to loss.png."""
        if not self.write:
            return
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
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def start_wandb(settings, run_dir: Path, run_id: str | None, config: dict[str, Any] | None):
    """`wandb.init` for a run folder: a new W&B run, or (`run_id`) the one a checkpoint names."""
    try:
        import wandb
    except ImportError:
        raise NewLLMError(WANDB_MISSING) from None
    try:
        return wandb.init(project=settings.project, entity=settings.entity, name=settings.name or run_dir.name,
                          group=settings.group, tags=list(settings.tags) or None, mode=settings.mode,
                          dir=str(run_dir), id=run_id, resume="allow" if run_id else None, config=config)
    except Exception as e:  # wandb's own errors (no API key, no network in online mode) come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise NewLLMError(f"wandb: could not start the run ({first}); set wandb.mode=offline to log without a "
                          "server, or wandb.enabled=false") from None


def _step(rec: dict[str, Any]) -> int:
    step = rec.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else 0
