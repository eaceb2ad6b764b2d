"""The training loop: AdamW + warmup/cosine, grad accumulation and clipping, optional AMP, periodic
sliding-window validation, exact resume.

One optimizer step::

    for each of grad_accum micro-batches:          # x: (B, T+1) windows of the token stream
        logits = model(x[:, :-1]).logits            # (B, T, V)
        loss = CE(logits, x[:, 1:])                 # mean over the B*T predicted tokens
        backward(loss / grad_accum)                 # so the summed gradient is the batch mean's
    clip the global grad norm; set lr(step); AdamW step

`carry_windows` > 1 (truncated BPTT: the state carried across consecutive windows of one stream) is
`newllm.train.tbptt.StreamTrainer`, which `train()` (newllm/train/run.py: a whole run from a recipe)
picks for it.

Under torchrun (WORLD_SIZE > 1, newllm/train/distributed.py) the same loop runs on every rank: each
rank reads its rows of every micro-batch, the step goes through DDP or FSDP2 (`self.net`; gradients
synced at the last micro-batch only), the loss is averaged across ranks before the non-finite
check, and the time budget counts the slowest rank, so every decision is the same on every rank.
Rank 0 alone writes metrics; checkpoints are DCP folders.

`compile: true`: `self.net` is `torch.compile` of that (the model, the DDP wrapper, or the model after
FSDP2 sharded it), `self.wrapped` the same uncompiled (what gradient sync and DCP checkpoints take),
and `self.model` the plain module (state dicts without `_orig_mod.` prefixes: checkpoints and resume
are as without compile). Evaluation calls the compiled model (`self.eval_net`). The compiled forward
skips the model's per-call token-id check, so the token arrays are range-checked once, here.

`mode: sequential | lct` (recurrent presets such as context_pythia) replaces the two loss lines by
`newllm.train.lct.step_loss`: the exact recurrence, or Lagged Cache Training with its per-window
hidden-state cache keyed by the window's index (staleness logged as kind "lct").

Data order. The training tokens are cut into windows of seq_len + 1 tokens with stride seq_len
(`TokenWindows`: every token is predicted once per epoch, no padding, the tail is dropped). Epoch e
visits the windows in `randperm(n, generator seeded by hash(seed, e))`; the data position is
(epoch, index within the permutation), so the order is a function of (seed, epoch) alone and a
resumed run reads exactly the windows the uninterrupted run would have read. An incomplete last
micro-batch of an epoch is dropped.

Resume. A checkpoint holds the weights, AdamW moments, GradScaler, step, tokens, training seconds,
RNG states, data position, the config and the W&B run id; restoring all of them makes the continued
run equal to the uninterrupted one (bit-equal on CPU in fp32: tests/train/test_resume.py, and for
2 processes tests/train/test_distributed.py).

Progress. On a terminal, a tqdm bar (`progress: true`); when stderr is not a terminal (a log file,
a background job) the bar would be off, so a one-line summary is printed every `log_every` steps
instead.

Non-finite loss. `on_nonfinite: stop` (default) raises `TrainingDiverged` naming the step, the loss
and the tokens seen; the last checkpoint stays as it was. `skip` drops that step's update (the step
and its data still count, so budgets end), counts it in the metrics (`skipped`), and stops once
more than `max_nonfinite_skips` steps were dropped. Silently training on NaN is never an option.
With fp16 AMP the GradScaler's own skip of overflowing steps is normal and not counted.
"""
from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from newllm.errors import NewLLMError
from newllm.train import checkpoint as ckpt
from newllm.train import distributed
from newllm.train.config import TrainConfig
from newllm.train.hardware import resolve_amp
from newllm.train.lct import make_cache, require_context_model, step_loss
from newllm.train.metrics import MetricsLog
from newllm.train.optim import budget_progress, build_optimizer, lr_factor, set_lr


class TrainingDiverged(NewLLMError):
    """The loss or gradient became NaN/Inf (see `on_nonfinite`)."""


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator().manual_seed(h)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NewLLMError(f"device {name!r}: CUDA is not available on this machine (use device=cpu or auto)")
    return dev


def check_shardable(batch_size: int, world_size: int) -> int:
    """The rows of a micro-batch each of `world_size` ranks takes (batch_size must divide evenly)."""
    if batch_size % world_size:
        raise NewLLMError(f"train: batch_size {batch_size} does not split into {world_size} processes: each rank "
                          f"takes batch_size / world_size windows of every micro-batch; use a multiple of {world_size}")
    return batch_size // world_size


class WindowSampler:
    """Batches of windows in a shuffled order that depends only on (seed, epoch); see the module doc.

    Position (epoch, index): the next batch is windows perm(epoch)[index : index + batch_size].
    Rank `rank` of `world_size` processes gets its rows [rank b, (rank + 1) b) of that batch
    (b = batch_size / world_size); the position stays the global one.
    """

    def __init__(self, windows, batch_size: int, seed: int, device=torch.device("cpu"), rank: int = 0,
                 world_size: int = 1):
        if len(windows) < batch_size:
            raise NewLLMError(f"training data has {len(windows)} windows of {windows.seq_len} tokens, "
                              f"fewer than batch_size {batch_size}")
        self.windows, self.batch_size, self.seed, self.device = windows, batch_size, seed, device
        rows = check_shardable(batch_size, world_size)
        self.rows = slice(rank * rows, (rank + 1) * rows)
        self.epoch, self.index = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index

    def next_batch(self) -> torch.Tensor:
        """(B, seq_len + 1) int64 windows at the current position; advances it."""
        B, n = self.batch_size, len(self.windows)
        if self.index + B > n:  # the incomplete last batch of an epoch is dropped
            self.epoch, self.index = self.epoch + 1, 0
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, torch.randperm(n, generator=epoch_generator(self.seed, self.epoch)))
        idx = self._perm[1][self.index: self.index + B][self.rows].tolist()
        self.index += B
        self.last_ids = idx  # the windows' indices: LCT keys its hidden-state cache by them
        return torch.stack([self.windows[i] for i in idx]).to(self.device, non_blocking=True)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


def check_token_range(tokens, vocab_size: int, what: str) -> None:
    """Raise a one-line error if a token id of the 1-D array `tokens` is outside [0, vocab_size)."""
    a = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if a.size == 0:
        return  # too few tokens for a window: TokenWindows / the evaluator say so
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        pos = int(np.flatnonzero(a.reshape(-1) == bad)[0])
        raise NewLLMError(f"{what}: token id {bad} at position {pos} is outside the model's vocabulary "
                          f"[0, {vocab_size})")


class Trainer:
    """Trains `model` on a 1-D token array; `run()` until the budget, `save()` / `load()` checkpoints.

    `self.model` is the model; `self.net` what a step calls (the model, its DDP wrapper, or the model
    sharded in place by FSDP2 under torchrun; with `compile: true` the torch.compile of that, while
    `self.model` stays the plain module, so state dicts and checkpoints are the same either way);
    `self.world` this process's rank (newllm.train.distributed)."""

    #: whether `batch_loss` computes through `self.net`, the part `compile: true` compiles; a subclass
    #: whose loss calls the model or its parts directly says False, and `compile: true` is refused for it
    step_through_net: bool = True

    def __init__(self, cfg: TrainConfig, model, train_tokens, valid_tokens=None, run_dir=None):
        from newllm.data.windows import TokenWindows

        self.cfg = cfg
        self.world = distributed.current()
        if self.world.distributed:
            self.device = distributed.rank_device(cfg.device, self.world.local_rank)
            if self.device != self.world.device:
                raise NewLLMError(f"device {cfg.device!r} is {self.device} on rank {self.world.rank}, but the process "
                                  f"group's backend runs on {self.world.device}")
            if cfg.mode != "parallel":
                raise NewLLMError(f"train: mode {cfg.mode!r} runs in one process only (its step calls the model "
                                  "outside one forward per backward); train it without torchrun")
        else:
            self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
        self.windows = TokenWindows(train_tokens, cfg.seq_len + 1, stride=cfg.seq_len)
        self.sampler = WindowSampler(self.windows, cfg.batch_size, cfg.seed, self.device, self.world.rank,
                                     self.world.world_size)
        # recurrent modes (newllm/train/lct.py), checked before any work; the LCT cache is not checkpointed
        # (a resumed run warms it up again)
        self.lct_cache = None
        if cfg.mode != "parallel":
            require_context_model(self.model, cfg.mode)
            self.lct_cache = make_cache(self.model, cfg.lct) if cfg.mode == "lct" else None
        self.valid_tokens = valid_tokens
        vocab = self.model.config.vocab_size  # checked once here: a compiled forward skips check_ids' value check
        check_token_range(train_tokens, vocab, "training tokens")
        if valid_tokens is not None:
            check_token_range(valid_tokens, vocab, "validation tokens")
        if cfg.compile and not self.step_through_net:
            raise NewLLMError(f"train: compile: true is not supported by {type(self).__name__} (its loss calls the "
                              "model's parts directly, not the compiled step); set compile: false")
        # what the step calls: the model, its DDP wrapper, or the model sharded in place (FSDP2); built before
        # the optimizer, since FSDP replaces the parameters. `self.wrapped` is it uncompiled (gradient sync and
        # distributed checkpoints need the wrapper itself); with compile, `self.net` is its torch.compile
        self.wrapped = distributed.wrap(self.model, cfg, self.world)
        self.net = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        # the evaluation forward (sliding-window perplexity runs the model itself, never the DDP wrapper)
        self.eval_net = (self.net if self.wrapped is self.model else torch.compile(self.model)) if cfg.compile else None
        self._compile_notes: set[str] = set()  # which of "step", "evaluation" printed their compiling line
        self.optimizer = self.make_optimizer()
        self.amp = resolve_amp(cfg.amp, self.device)  # "auto" -> bf16 where the device has native bf16, else none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.step = 0
        self.tokens = 0  # predicted tokens consumed (all ranks together)
        self.elapsed_s = 0.0  # seconds spent in training steps (not eval / checkpoints); the slowest rank's
        self.skipped = 0
        self.metrics: MetricsLog | None = None
        self.wandb_run_id: str | None = None  # kept in checkpoints, so a resume continues the same W&B run

    def autocast(self):
        if self.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ data
    def next_batch(self) -> torch.Tensor:
        return self.sampler.next_batch()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def index(self) -> int:
        return self.sampler.index

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        cfg = self.cfg
        self.net.train()
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            with distributed.grad_sync(self.wrapped, self.world, sync=micro == cfg.grad_accum - 1):
                loss = self.batch_loss(self.next_batch(), micro)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.detach()
        step = self.step + 1
        loss_value = float(self.world.mean(total)) / cfg.grad_accum  # the same on every rank: one decision
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = float(distributed.full_value(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        factor = lr_factor(step, budget_progress(cfg, step, self.tokens + cfg.tokens_per_step, self.elapsed_s),
                           cfg.warmup_steps, cfg.min_lr / cfg.lr)
        set_lr(self.optimizer, factor)
        skipped = False
        bad = not math.isfinite(loss_value) or (self.amp != "fp16" and not math.isfinite(grad_norm))
        if bad:
            what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {grad_norm}"
            if cfg.on_nonfinite == "stop":
                raise TrainingDiverged(f"non-finite {what} at step {step} (tokens seen {self.tokens}); the last "
                                       f"checkpoint is kept; lower lr, check grad_clip, or set on_nonfinite=skip")
            self.skipped += 1
            skipped = True
            if self.skipped > cfg.max_nonfinite_skips:
                raise TrainingDiverged(f"non-finite {what} at step {step}: {self.skipped} steps skipped, more than "
                                       f"max_nonfinite_skips={cfg.max_nonfinite_skips}")
            if self.world.is_main:
                warnings.warn(f"non-finite {what} at step {step}: update skipped ({self.skipped} so far, at most "
                              f"{cfg.max_nonfinite_skips})")
            self.scaler.update()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.tokens += cfg.tokens_per_step
        return StepResult(loss_value, grad_norm, self.cfg.lr * factor, skipped)

    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the model's parameter groups (`newllm.train.optim`); a subclass may group differently
        (each group needs a `name` and a `base_lr`, and `_group_base_lr(name)` to give it back on resume)."""
        return build_optimizer(self.model, self.cfg)

    def batch_loss(self, x: torch.Tensor, micro: int) -> torch.Tensor:
        """The loss of one micro-batch x (B, seq_len + 1): next-token CE in mode parallel (the recurrent
        modes: `recurrent_loss`). A subclass may compute another loss from the same windows (through
        `self.net`, so that it also trains under torchrun)."""
        with self.autocast():
            if self.cfg.mode != "parallel":  # sequential / lct: all seq_len + 1 tokens in, seq_len predictions scored
                return self.recurrent_loss(x, measure=micro == 0)
            return self.next_token_loss(x)[0]

    def next_token_loss(self, x: torch.Tensor, state=None):
        """(loss, output) of `self.net` reading x[:, :-1] (from `state`) and scoring x[:, 1:], called
        under `autocast()`: the LM head's loss by chunks of `loss_chunk` positions
        (newllm.models.ops.loss), or with `loss_chunk: 0` F.cross_entropy on the whole fp32 logits."""
        if self.cfg.loss_chunk:
            out = self.net(x[:, :-1], state=state, targets=x[:, 1:], loss_chunk=self.cfg.loss_chunk)
            return out.loss, out
        out = self.net(x[:, :-1], state=state)
        return F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten()), out

    def recurrent_loss(self, x: torch.Tensor, measure: bool) -> torch.Tensor:
        """Loss of one micro-batch in mode sequential or lct; logs LCT staleness every lct.staleness_every steps."""
        c, step = self.cfg.lct, self.step + 1
        measure = measure and self.cfg.mode == "lct" and c.staleness_every > 0 and step % c.staleness_every == 0
        info = step_loss(self.cfg.mode, self.model, x, self.sampler.last_ids, self.lct_cache, c, labels=x,
                         measure_staleness=measure)
        if info.staleness is not None and self.metrics is not None:
            self.metrics.log("lct", step, staleness=info.staleness, staleness_cached=info.staleness_cached,
                             staleness_rel=info.staleness_rel, measure_s=info.measure_s,
                             cached_samples=len(self.lct_cache))
        return info.loss

    # ------------------------------------------------------------------ budget
    def done(self) -> bool:
        c = self.cfg
        return ((c.max_steps is not None and self.step >= c.max_steps)
                or (c.max_tokens is not None and self.tokens >= c.max_tokens)
                or (c.max_minutes is not None and self.elapsed_s >= 60.0 * c.max_minutes))

    def _bar_total(self) -> int | None:
        c = self.cfg
        totals = [c.max_steps] if c.max_steps is not None else []
        if c.max_tokens is not None:
            totals.append(math.ceil(c.max_tokens / c.tokens_per_step))
        return min(totals) if totals else None

    # ------------------------------------------------------------------ run
    def run(self, stop_after: int | None = None, tensorboard: bool = True) -> None:
        """Train until the budget is spent (or `stop_after` steps), checkpointing on the way and at the end."""
        from tqdm import tqdm

        cfg, main = self.cfg, self.world.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics is None:
            self.metrics = MetricsLog(self.run_dir, resume_step=self.step, tensorboard=tensorboard,
                                      wandb=cfg.wandb if cfg.wandb.enabled else None, wandb_run_id=self.wandb_run_id,
                                      config=cfg.to_dict(), write=main)
            self.wandb_run_id = self.metrics.wandb_run_id
        if cfg.compile and not self.done():
            self.compile_note("step", "compiling the step (torch.compile), the first step takes longer")
        show = cfg.progress and main
        bar = tqdm(total=self._bar_total(), initial=self.step, disable=None if show else True, unit="step",
                   dynamic_ncols=True)
        lines = show and bar.disable  # not a terminal: one summary line every log_every steps instead of a bar
        last_t, last_tokens, last_ckpt = self.elapsed_s, self.tokens, self.step
        try:
            while not self.done() and (stop_after is None or self.step < stop_after):
                t0 = time.perf_counter()
                r = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.elapsed_s += self.world.max(time.perf_counter() - t0)  # one clock for all ranks
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.done():
                    dt = self.elapsed_s - last_t
                    tps = (self.tokens - last_tokens) / dt if dt > 0 else float("nan")
                    last_t, last_tokens = self.elapsed_s, self.tokens
                    self.metrics.log("train", self.step, loss=r.loss, lr=r.lr, grad_norm=r.grad_norm,
                                     tokens=self.tokens, tokens_per_s=tps, elapsed_s=self.elapsed_s,
                                     epoch=self.epoch, skipped=self.skipped, **self.gate_stats())
                    post = {"loss": f"{r.loss:.3f}", "tok/s": f"{tps:,.0f}"}
                    if cfg.max_minutes is not None:
                        left = max(60 * cfg.max_minutes - self.elapsed_s, 0)
                        post["left"] = f"{int(left // 60)}:{int(left % 60):02d}"
                    bar.set_postfix(post)
                    if lines:
                        print(self.progress_line(r, post), flush=True)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and not self.done():
                    self.validate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                    last_ckpt = self.step
            final = self.step != last_ckpt or not (self.run_dir / "checkpoints" / "latest").exists()
            if self.world.broadcast_int(final):  # rank 0's view of the folder decides for all
                self.save()
        finally:
            bar.close()

    def progress_line(self, r: StepResult, post: dict[str, str]) -> str:
        """`step 120/1000 (12%) loss 4.213 lr 5.9e-04 tok/s 2,310 elapsed 0:01:03 [left 4:12]`."""
        total = self._bar_total()
        where = f"{self.step}/{total} ({100 * self.step / total:.0f}%)" if total else f"{self.step}"
        e = int(self.elapsed_s)
        line = (f"step {where} loss {r.loss:.3f} lr {r.lr:.1e} tok/s {post['tok/s']} "
                f"elapsed {e // 3600}:{e // 60 % 60:02d}:{e % 60:02d}")
        if "left" in post:
            line += f" left {post['left']}"
        return line + (f" skipped {self.skipped}" if self.skipped else "")

    def gate_stats(self) -> dict[str, float]:
        """mean/min/max of every gate a layer declares (`BaseLayer.gates()`), keyed
        `gate.L{i}.{name}.mean` etc. (`gate.L0.memory.mean`: sigmoid(beta) of layer 0). Under FSDP a
        gate is gathered first (a collective: every rank computes these)."""
        out = {}
        for i, layer in enumerate(self.model.layers):
            for name, g in layer.gates().items():
                g = distributed.full_value(g.detach()).float()
                out.update({f"gate.L{i}.{name}.mean": float(g.mean()), f"gate.L{i}.{name}.min": float(g.min()),
                            f"gate.L{i}.{name}.max": float(g.max())})
        return out

    # ------------------------------------------------------------------ evaluation
    def perplexity(self, tokens, text: str | None = None, progress: bool = False):
        """Sliding-window perplexity of the model (every rank computes it: an FSDP forward needs them all)."""
        from newllm.eval.perplexity import sliding_window_perplexity

        e = self.cfg.eval
        if self.eval_net is not None:
            self.compile_note("evaluation", "compiling the evaluation forward (torch.compile), the first "
                                            "evaluation takes longer")
        self.model.eval()
        with torch.no_grad():
            return sliding_window_perplexity(self.model, tokens, context=e.context, stride=e.stride,
                                             batch_size=e.batch_size, text=text, progress=progress,
                                             forward=self.eval_net)

    def compile_note(self, what: str, line: str) -> None:
        """Print `line` (rank 0) the first time `what` runs compiled, so that a long compile is not a silent wait."""
        if what not in self._compile_notes and self.world.is_main:
            print(line, flush=True)
        self._compile_notes.add(what)

    def validate(self) -> None:
        """Sliding-window token PPL on the first eval.max_tokens validation tokens; logged and plotted."""
        if self.valid_tokens is None:
            return
        n = self.cfg.eval.max_tokens
        tokens = self.valid_tokens if n is None else self.valid_tokens[:n]
        t0 = time.perf_counter()
        res = self.perplexity(tokens, progress=False)
        self.metrics.log("eval", self.step, split="valid", token_ppl=res.token_ppl, n_tokens=res.n_tokens,
                         nll=res.nll_sum / max(res.n_tokens, 1), eval_s=time.perf_counter() - t0)
        self.metrics.plot()

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """What a checkpoint holds for the whole run (the same on every rank)."""
        return {"config": self.cfg.to_dict(), "model_fingerprint": self.model.config.fingerprint(),
                "scaler": self.scaler.state_dict(), "data": {"epoch": self.epoch, "index": self.index},
                "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s, "skipped": self.skipped,
                "tracking": {"wandb_run_id": self.wandb_run_id}}

    def local_state(self) -> dict[str, Any]:
        """What a checkpoint holds for this rank alone: its RNG states (a subclass adds its own)."""
        return {"rng": ckpt.rng_state()}

    def load_local_state(self, s: dict[str, Any], where: Path) -> None:
        """Restore `local_state()` from `s` (read from `where`)."""
        ckpt.set_rng_state(s["rng"])

    def save(self) -> Path:
        root = self.run_dir / "checkpoints"
        if self.world.distributed:
            return distributed.save_checkpoint(root, self.step, self.world, self.wrapped, self.model, self.optimizer,
                                               self.cfg.distributed, self.state(), self.local_state(),
                                               keep=self.cfg.keep_checkpoints)
        state = {**self.state(), "optimizer": self.optimizer.state_dict(), **self.local_state()}
        return ckpt.save_checkpoint(root, self.step, self.model, state, keep=self.cfg.keep_checkpoints)

    def load(self, folder) -> None:
        """Restore a checkpoint folder written by `save` (see `checkpoint.find_checkpoint`)."""
        folder = Path(folder)
        s = ckpt.load_trainer_state(folder)
        if s["model_fingerprint"] != self.model.config.fingerprint():
            raise NewLLMError(f"{folder / ckpt.STATE_FILE}: checkpoint is for a different model "
                              f"(fingerprint {s['model_fingerprint']}, this model {self.model.config.fingerprint()})")
        if self.world.distributed:
            local = distributed.load_checkpoint(folder, s, self.world, self.wrapped, self.optimizer)
            local_where = folder / distributed.rank_file(self.world.rank)
        else:
            if "distributed" in s:
                n = s["distributed"].get("world_size") if isinstance(s["distributed"], dict) else "several"
                raise NewLLMError(f"{folder / ckpt.STATE_FILE}: written by {n} processes (torch.distributed."
                                  f"checkpoint); resume it with torchrun and {n} processes (its weights load anywhere: "
                                  "the checkpoint folder is a model folder)")
            ckpt.load_weights(self.model, folder)
            try:
                self.optimizer.load_state_dict(s["optimizer"])
            except (ValueError, KeyError) as e:
                raise NewLLMError(f"{folder / ckpt.STATE_FILE}: optimizer state does not fit this model ({e})") from None
            local, local_where = s, folder / ckpt.STATE_FILE
        for g in self.optimizer.param_groups:  # a --set lr/param_groups change on resume takes effect
            g["base_lr"] = self._group_base_lr(g["name"])
        if s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.load_local_state(local, local_where)
        self.step, self.tokens = int(s["step"]), int(s["tokens"])
        self.elapsed_s, self.skipped = float(s.get("elapsed_s", 0.0)), int(s.get("skipped", 0))
        self.wandb_run_id = (s.get("tracking") or {}).get("wandb_run_id")
        self.sampler.seek(int(s["data"]["epoch"]), int(s["data"]["index"]))

    def _group_base_lr(self, name: str) -> float:
        if name in ("decay", "no_decay"):
            return self.cfg.lr
        return float(self.cfg.param_groups.get(name, {}).get("lr", self.cfg.lr))
