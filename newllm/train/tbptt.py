"""Truncated backpropagation through time: the state carried across consecutive windows of one stream.

With `carry_windows` r > 1 (TrainConfig) a training window no longer starts from an empty state.
The token stream is cut into chunks of r windows (r x seq_len + 1 tokens: contiguous text, a long
document trains as one stream); each batch row reads one chunk, one window per optimizer step, and
the state the model returned for window j (its memories, its KV caches) is the state window j + 1
starts from, detached::

    step i, micro-batch m:  x = window (i mod r) of the chunks of group (block, m)    (B, seq_len + 1)
                            out = model(x[:, :-1], state=carried[m] if i mod r else None)
                            carried[m] = detach(out.state)

So gradients flow through every segment of a window (seq_len = k x segment_length: k segments, the
memory written k - 1 times inside the graph) and stop at the window's start: the memory the window
read at its first segment was written by the previous window, with no gradient back into it.
That is the Infini-attention paper's training (and Hugging Face's replication, whose memory learned
to write only once gradients spanned enough segments).

Data order. Epoch e shuffles the chunks with `randperm(n, generator seeded by hash(seed, e))`; a
block of r steps takes `batch_size x grad_accum` chunks from it, micro-batch m its own
`batch_size`; the incomplete last block of an epoch is dropped. The position (epoch, index: the
micro-batches read in this epoch) and the carried states are saved in every checkpoint, so a
resumed run equals the uninterrupted one. Under torchrun rank r reads its rows of every micro-batch
(`rank`, `world_size`: the same chunks a single process reads, split) and carries their states; a
distributed checkpoint keeps each rank's carried states in its rank file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from newllm.errors import NewLLMError
from newllm.models.model import detach_state
from newllm.train.loop import Trainer, check_shardable, epoch_generator


class ChunkSampler:
    """Windows of consecutive chunks (module doc). `next_batch()` returns (B, seq_len + 1) and sets
    `last_window` (0: the first window of its chunks, the state starts empty) and `last_micro`."""

    def __init__(self, tokens, seq_len: int, windows: int, batch_size: int, grad_accum: int, seed: int,
                 device=torch.device("cpu"), rank: int = 0, world_size: int = 1):
        self.tokens = torch.as_tensor(tokens).long() if not isinstance(tokens, torch.Tensor) else tokens.long()
        self.seq_len, self.windows, self.batch_size, self.grad_accum = seq_len, windows, batch_size, grad_accum
        self.seed, self.device = seed, device
        self.chunk = windows * seq_len
        self.n_chunks = (len(self.tokens) - 1) // self.chunk
        per_block = batch_size * grad_accum
        if self.n_chunks < per_block:
            raise NewLLMError(f"training data has {self.n_chunks} chunks of carry_windows x seq_len = {self.chunk} "
                              f"tokens, fewer than batch_size x grad_accum = {per_block}; lower carry_windows or "
                              "seq_len, or give more data")
        self.blocks = self.n_chunks // per_block
        rows = check_shardable(batch_size, world_size)
        self.rows = slice(rank * rows, (rank + 1) * rows)
        self.epoch, self.index = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None
        self.last_window, self.last_micro, self.last_ids = 0, 0, []

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index

    def next_batch(self) -> torch.Tensor:
        r, A, B = self.windows, self.grad_accum, self.batch_size
        if self.index >= self.blocks * r * A:
            self.epoch, self.index = self.epoch + 1, 0
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, torch.randperm(self.n_chunks, generator=epoch_generator(self.seed, self.epoch)))
        block, within = divmod(self.index, r * A)
        window, micro = divmod(within, A)
        group = (block * A + micro) * B
        chunks = self._perm[1][group: group + B][self.rows].tolist()
        self.index += 1
        self.last_window, self.last_micro, self.last_ids = window, micro, chunks
        a = window * self.seq_len
        rows = [self.tokens[c * self.chunk + a: c * self.chunk + a + self.seq_len + 1] for c in chunks]
        return torch.stack(rows).to(self.device, non_blocking=True)


class StreamTrainer(Trainer):
    """The Trainer with the state carried across `carry_windows` consecutive windows (module doc)."""

    def __init__(self, cfg, model, train_tokens, valid_tokens=None, run_dir=None):
        if cfg.carry_windows < 2:
            raise NewLLMError(f"StreamTrainer: carry_windows must be >= 2, got {cfg.carry_windows} (use Trainer)")
        super().__init__(cfg, model, train_tokens, valid_tokens, run_dir)
        self.sampler = ChunkSampler(train_tokens, cfg.seq_len, cfg.carry_windows, cfg.batch_size, cfg.grad_accum,
                                    cfg.seed, self.device, self.world.rank, self.world.world_size)
        self.carried: list[tuple | None] = [None] * cfg.grad_accum  # per micro-batch: the detached state

    def batch_loss(self, x: torch.Tensor, micro: int) -> torch.Tensor:
        """Next-token CE of window x, continuing from the state its chunk's previous window left
        (none at a chunk's first window); keeps the new state, detached, for the next window."""
        state = self.carried[micro] if self.sampler.last_window else None
        with self.autocast():
            loss, out = self.next_token_loss(x, state)
        self.carried[micro] = detach_state(out.state)
        return loss

    # ------------------------------------------------------------------ checkpoints: the carried states too
    def local_state(self) -> dict[str, Any]:
        s = super().local_state()
        s["carried"] = [None if st is None else [None if e is None else list(e) for e in st] for st in self.carried]
        return s

    def load_local_state(self, s: dict[str, Any], where: Path) -> None:
        super().load_local_state(s, where)
        saved = s.get("carried")
        if saved is None or len(saved) != len(self.carried):
            raise NewLLMError(f"{where}: no carried states for {len(self.carried)} micro-batches (not a "
                              "carry_windows checkpoint of this config)")
        types = [layer.state_type for layer in self.model.layers] + list(self.model.extra_state_types)
        self.carried = [None if st is None else tuple(None if e is None else t(*[v.to(self.device) for v in e])
                                                      for t, e in zip(types, st))
                        for st in saved]


def trainer_class(cfg) -> type[Trainer]:
    """StreamTrainer for truncated BPTT (`carry_windows` > 1), else Trainer."""
    return StreamTrainer if cfg.carry_windows > 1 else Trainer
