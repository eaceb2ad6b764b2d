"""The model protocol the evaluators use, for stub models: an `nn.Module` with `memory_aside`.

A stub holds no memory, so its `memory_aside` only sets the mode and puts the old one back, as
`TransformerLM.memory_aside` does for the mode. Subclasses add `forward` (taking `logits_to_keep`
where the evaluator passes it) or `generate`.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


class StubLM(nn.Module):
    @contextmanager
    def memory_aside(self, train: bool | None = None):
        was_training = self.training
        if train is not None:
            self.train(train)
        try:
            yield self
        finally:
            self.train(was_training)
