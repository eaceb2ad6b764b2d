"""Numeric watch (seed 000's "NaN/Inf monitoring" and fp16 overflow checks) over a model's layers.

    with NumericWatch(model) as watch:
        model(ids)
    watch.counts   # {"L3": {"nonfinite": 0, "fp16_overflow": 12, "max_abs": 7.1e4, "calls": 1}, ...}

Forward hooks on every layer (its output hidden state) and on every layer's token mixer count
elements that are NaN/Inf and finite elements whose magnitude exceeds fp16's largest value
(65,504: `torch.finfo(torch.float16).max`), which would overflow if the model ran in fp16. The
counts are kept per layer ("L3", "L3.mixer") and summed over calls until `reset()`. A watch never
changes what the model computes; `warn=True` issues one warning per module the first time it sees
a non-finite value.

The memory path has its own guards (newllm/models/ops/memory.py): keys and queries pre-scaled by
1/sqrt(d) (never L2-normalised), an optional clamp of each update, fp32 accumulation, and a
non-finite update skipped, warned about and counted in the memory state (`skipped`). The trainer
skips a step whose loss or gradient is non-finite (`on_nonfinite: skip`), with a warning and a
counter. This watch is the third net: where in the stack a value went wrong.
"""
from __future__ import annotations

import warnings

import torch

FP16_MAX = float(torch.finfo(torch.float16).max)


class NumericWatch:
    def __init__(self, model, fp16_limit: float = FP16_MAX, warn: bool = True):
        self.model, self.limit, self.warn = model, fp16_limit, warn
        self.counts: dict[str, dict[str, float]] = {}
        self._handles = []
        self._warned: set[str] = set()

    def __enter__(self) -> "NumericWatch":
        for i, layer in enumerate(self.model.layers):
            self._hook(f"L{i}", layer)
            mixer = getattr(layer, "mixer", None)
            if mixer is not None:
                self._hook(f"L{i}.mixer", mixer)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.counts.clear()

    def _hook(self, name: str, module) -> None:
        self.counts.setdefault(name, {"nonfinite": 0, "fp16_overflow": 0, "max_abs": 0.0, "calls": 0})

        def hook(_module, _inputs, output):
            y = output[0] if isinstance(output, tuple) else output
            self.observe(name, y)

        self._handles.append(module.register_forward_hook(hook))

    @torch.no_grad()
    def observe(self, name: str, y: torch.Tensor) -> None:
        c = self.counts.setdefault(name, {"nonfinite": 0, "fp16_overflow": 0, "max_abs": 0.0, "calls": 0})
        y = y.detach()
        finite = torch.isfinite(y)
        bad = int((~finite).sum())
        mag = y.abs().masked_fill(~finite, 0)
        c["nonfinite"] += bad
        c["fp16_overflow"] += int((mag > self.limit).sum())
        c["max_abs"] = max(c["max_abs"], float(mag.max()) if mag.numel() else 0.0)
        c["calls"] += 1
        if bad and self.warn and name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"{name}: {bad} NaN/Inf values in its output")

    def totals(self) -> dict[str, int]:
        """NaN/Inf and fp16-overflow counts summed over the layers' outputs (mixers counted apart)."""
        layers = [c for n, c in self.counts.items() if "." not in n]
        mixers = [c for n, c in self.counts.items() if n.endswith(".mixer")]
        return {"nonfinite": sum(c["nonfinite"] for c in layers),
                "fp16_overflow": sum(c["fp16_overflow"] for c in layers),
                "mixer_nonfinite": sum(c["nonfinite"] for c in mixers),
                "mixer_fp16_overflow": sum(c["fp16_overflow"] for c in mixers)}

    def flagged(self) -> dict[str, dict[str, float]]:
        """Only the modules that saw a NaN/Inf or an fp16 overflow."""
        return {n: dict(c) for n, c in self.counts.items() if c["nonfinite"] or c["fp16_overflow"]}
