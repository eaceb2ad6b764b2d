"""The training loop: AdamW + warmup/cosine, grad accumulation and clipping, optional AMP, periodic
sliding-window validation, exact resume.

One optimizer step::

    for each of grad_accum micro-batches:          # x: (B, T+1) windows of the token stream
        logits = model(x[:, :-1]).logits            # (B, T, V)
        loss = CE(logits, x[:, 1:])                 # mean over the B*T predicted tokens
        backward(loss / grad_accum)                 # so the summed gradient is the batch mean's
    clip the global grad norm; set lr(step); AdamW step

`carry_windows` > 1 (truncated BPTT: the state carried across consecutive windows of one stream) is
`newllm.train.tbptt.StreamTrainer`, which `train()` picks for it.

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
RNG states, data position and the config; restoring all of them makes the continued run equal to
the uninterrupted one (bit-equal on CPU in fp32: tests/train/test_resume.py).

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
from newllm.files import atomic_write, write_json, write_text
from newllm.train import checkpoint as ckpt
from newllm.train.config import TrainConfig
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


class WindowSampler:
    """Batches of windows in a shuffled order that depends only on (seed, epoch); see the module doc.

    Position (epoch, index): the next batch is windows perm(epoch)[index : index + batch_size].
    """

    def __init__(self, windows, batch_size: int, seed: int, device=torch.device("cpu")):
        if len(windows) < batch_size:
            raise NewLLMError(f"training data has {len(windows)} windows of {windows.seq_len} tokens, "
                              f"fewer than batch_size {batch_size}")
        self.windows, self.batch_size, self.seed, self.device = windows, batch_size, seed, device
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
        idx = self._perm[1][self.index: self.index + B].tolist()
        self.index += B
        self.last_ids = idx  # the windows' indices: LCT keys its hidden-state cache by them
        return torch.stack([self.windows[i] for i in idx]).to(self.device, non_blocking=True)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


class Trainer:
    """Trains `model` on a 1-D token array; `run()` until the budget, `save()` / `load()` checkpoints."""

    def __init__(self, cfg: TrainConfig, model, train_tokens, valid_tokens=None, run_dir=None):
        from newllm.data.windows import TokenWindows

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
        self.windows = TokenWindows(train_tokens, cfg.seq_len + 1, stride=cfg.seq_len)
        self.sampler = WindowSampler(self.windows, cfg.batch_size, cfg.seed, self.device)
        # recurrent modes (newllm/train/lct.py), checked before any work; the LCT cache is not checkpointed
        # (a resumed run warms it up again)
        self.lct_cache = None
        if cfg.mode != "parallel":
            require_context_model(self.model, cfg.mode)
            self.lct_cache = make_cache(self.model, cfg.lct) if cfg.mode == "lct" else None
        self.valid_tokens = valid_tokens
        self.optimizer = self.make_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.step = 0
        self.tokens = 0  # predicted tokens consumed
        self.elapsed_s = 0.0  # seconds spent in training steps (not eval / checkpoints)
        self.skipped = 0
        self.metrics: MetricsLog | None = None

    def autocast(self):
        if self.cfg.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
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
        cfg, model = self.cfg, self.model
        model.train()
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            loss = self.batch_loss(self.next_batch(), micro)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.detach()
        step = self.step + 1
        loss_value = float(total) / cfg.grad_accum
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        factor = lr_factor(step, budget_progress(cfg, step, self.tokens + cfg.tokens_per_step, self.elapsed_s),
                           cfg.warmup_steps, cfg.min_lr / cfg.lr)
        set_lr(self.optimizer, factor)
        skipped = False
        bad = not math.isfinite(loss_value) or (cfg.amp != "fp16" and not math.isfinite(grad_norm))
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
        modes: `recurrent_loss`). A subclass may compute another loss from the same windows."""
        with self.autocast():
            if self.cfg.mode != "parallel":  # sequential / lct: all seq_len + 1 tokens in, seq_len predictions scored
                return self.recurrent_loss(x, measure=micro == 0)
            logits = self.model(x[:, :-1]).logits  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())

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

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics is None:
            self.metrics = MetricsLog(self.run_dir, resume_step=self.step, tensorboard=tensorboard)
        bar = tqdm(total=self._bar_total(), initial=self.step, disable=None if cfg.progress else True, unit="step",
                   dynamic_ncols=True)
        last_t, last_tokens, last_ckpt = self.elapsed_s, self.tokens, self.step
        try:
            while not self.done() and (stop_after is None or self.step < stop_after):
                t0 = time.perf_counter()
                r = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.elapsed_s += time.perf_counter() - t0
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
                if cfg.eval.every and self.step % cfg.eval.every == 0 and not self.done():
                    self.validate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                    last_ckpt = self.step
            if self.step != last_ckpt or not (self.run_dir / "checkpoints" / "latest").exists():
                self.save()
        finally:
            bar.close()

    def gate_stats(self) -> dict[str, float]:
        """mean/min/max of every gate a layer declares (`BaseLayer.gates()`), keyed
        `gate.L{i}.{name}.mean` etc. (`gate.L0.memory.mean`: sigmoid(beta) of layer 0)."""
        out = {}
        for i, layer in enumerate(self.model.layers):
            for name, g in layer.gates().items():
                g = g.detach().float()
                out.update({f"gate.L{i}.{name}.mean": float(g.mean()), f"gate.L{i}.{name}.min": float(g.min()),
                            f"gate.L{i}.{name}.max": float(g.max())})
        return out

    # ------------------------------------------------------------------ evaluation
    def perplexity(self, tokens, text: str | None = None, progress: bool = False):
        from newllm.eval.perplexity import sliding_window_perplexity

        e = self.cfg.eval
        self.model.eval()
        with torch.no_grad():
            return sliding_window_perplexity(self.model, tokens, context=e.context, stride=e.stride,
                                             batch_size=e.batch_size, text=text, progress=progress)

    def validate(self) -> None:
        """Sliding-window token PPL on the first eval.max_tokens validation tokens; logged and plotted."""
        if self.valid_tokens is None:
            return
        n = self.cfg.eval.max_tokens
        tokens = self.valid_tokens if n is None else self.valid_tokens[:n]
        t0 = time.perf_counter()
        res = self.perplexity(tokens)
        self.metrics.log("eval", self.step, split="valid", token_ppl=res.token_ppl, n_tokens=res.n_tokens,
                         nll=res.nll_sum / max(res.n_tokens, 1), eval_s=time.perf_counter() - t0)
        self.metrics.plot()

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "model_fingerprint": self.model.config.fingerprint(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": ckpt.rng_state(), "data": {"epoch": self.epoch, "index": self.index},
                "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s, "skipped": self.skipped}

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, self.model, self.state(),
                                    keep=self.cfg.keep_checkpoints)

    def load(self, folder) -> None:
        """Restore a checkpoint folder written by `save` (see `checkpoint.find_checkpoint`)."""
        folder = Path(folder)
        s = ckpt.load_trainer_state(folder)
        if s["model_fingerprint"] != self.model.config.fingerprint():
            raise NewLLMError(f"{folder / ckpt.STATE_FILE}: checkpoint is for a different model "
                              f"(fingerprint {s['model_fingerprint']}, this model {self.model.config.fingerprint()})")
        ckpt.load_weights(self.model, folder)
        try:
            self.optimizer.load_state_dict(s["optimizer"])
        except (ValueError, KeyError) as e:
            raise NewLLMError(f"{folder / ckpt.STATE_FILE}: optimizer state does not fit this model ({e})") from None
        for g in self.optimizer.param_groups:  # a --set lr/param_groups change on resume takes effect
            g["base_lr"] = self._group_base_lr(g["name"])
        if s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        ckpt.set_rng_state(s["rng"])
        self.step, self.tokens = int(s["step"]), int(s["tokens"])
        self.elapsed_s, self.skipped = float(s.get("elapsed_s", 0.0)), int(s.get("skipped", 0))
        self.sampler.seek(int(s["data"]["epoch"]), int(s["data"]["index"]))

    def _group_base_lr(self, name: str) -> float:
        if name in ("decay", "no_decay"):
            return self.cfg.lr
        return float(self.cfg.param_groups.get(name, {}).get("lr", self.cfg.lr))


# ---------------------------------------------------------------------- the whole run
#: what a run writes into its folder: a fresh run refuses a folder holding any of them (unless forced)
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "results.json", "config.yaml", "tokenizer.json",
               "loss.png", "tensorboard")


def claim_run_dir(run_dir: Path, force: bool = False) -> None:
    """Make `run_dir` ready for a fresh run. A folder that holds a previous run's outputs is refused
    (nothing a user made is lost): resume it, choose another run_dir, or pass `force` to start over,
    which deletes those outputs (only newllm's own names, `RUN_OUTPUTS`) before anything is written."""
    import shutil

    if run_dir.exists() and not run_dir.is_dir():
        raise NewLLMError(f"run_dir {run_dir}: exists and is not a folder")
    taken = [n for n in RUN_OUTPUTS if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    if taken and not force:
        raise NewLLMError(f"run_dir {run_dir}: holds a previous run ({', '.join(taken)}); continue it with "
                          f"--resume {run_dir}, choose another run_dir, or pass --force to start over (deletes them)")
    for n in taken:
        p = run_dir / n
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def prepare_tokenizer(cfg: TrainConfig, run_dir: Path, data_dir=None, *, resume_from: Path | None):
    """The run's tokenizer, written to run_dir/tokenizer.json. Resuming (`resume_from`: the run folder
    the checkpoint belongs to): its tokenizer.json, the one the checkpoint was trained with (built
    again only if that run stopped before writing it). A fresh run (`resume_from=None`) never reuses
    a tokenizer.json it finds: it loads the configured file or trains a new BPE."""
    from newllm.checkpoints import load_tokenizer

    saved = run_dir / "tokenizer.json"
    if resume_from is not None and (resume_from / "tokenizer.json").exists():
        tok = load_tokenizer(resume_from / "tokenizer.json")
        if Path(resume_from).resolve() != run_dir.resolve():
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(saved, tok.save)
        return tok
    if cfg.data.tokenizer is not None:
        tok = load_tokenizer(cfg.data.tokenizer)
    else:
        from newllm.data.bpe import train_bpe
        from newllm.data.corpora import load_documents

        docs = load_documents(cfg.data.corpus, split=cfg.data.train_split, data_dir=data_dir)
        tok = train_bpe(docs, cfg.data.bpe_vocab_size, min_frequency=cfg.data.bpe_min_frequency)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(saved, tok.save)
    return tok


def build_model(cfg: TrainConfig, tokenizer):
    from newllm.models.presets import create_model

    overrides = dict(cfg.model.overrides)
    vocab = overrides.setdefault("vocab_size", tokenizer.vocab_size)
    if vocab < tokenizer.vocab_size:
        raise NewLLMError(f"model.overrides.vocab_size {vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if tokenizer.eos_token_id is not None:
        overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    return create_model(cfg.model.preset, **overrides)


def train(cfg: TrainConfig, resume=None, data_dir=None, stop_after: int | None = None,
          tensorboard: bool = True, force: bool = False) -> dict[str, Any]:
    """Run a recipe end to end: tokenizer, tokens, model, training, final model, final evaluation.

    Returns the final results (also written to RUN_DIR/results.json). `resume` is a run folder or a
    checkpoint folder; `stop_after` halts after that many steps (with a checkpoint), for tests and
    for splitting a run into sessions. A fresh run refuses a run_dir that holds a previous run unless
    `force` (`claim_run_dir`); so does a resume whose run_dir is another run's folder.
    """
    from newllm.data.corpora import load_tokens
    from newllm.train.tbptt import trainer_class

    data_dir = data_dir or cfg.data.data_dir
    folder = ckpt.find_checkpoint(resume) if resume is not None else None
    run_dir = Path(cfg.run_dir)
    source = ckpt.owning_run(folder) if folder is not None else None  # None: a checkpoint outside any run
    if source is None or source.resolve() != run_dir.resolve():
        claim_run_dir(run_dir, force)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_all(cfg.seed)
    tok = prepare_tokenizer(cfg, run_dir, data_dir, resume_from=source)
    load = dict(tokenizer=tok, data_dir=data_dir, cache_dir=cfg.data.cache_dir)
    train_tokens = load_tokens(cfg.data.corpus, cfg.data.train_split, **load)
    valid_tokens = load_tokens(cfg.data.corpus, cfg.data.valid_split, **load) if cfg.eval.every else None
    seed_all(cfg.seed)  # model init depends on the seed only, not on what tokenizing consumed
    model = build_model(cfg, tok)
    trainer = trainer_class(cfg)(cfg, model, train_tokens, valid_tokens, run_dir=run_dir)
    if folder is not None:
        trainer.load(folder)
    write_text(run_dir / "config.yaml", _yaml(cfg.to_dict()))
    print(f"newllm train: {model.num_parameters():,} parameters, {len(train_tokens):,} training tokens, "
          f"{cfg.tokens_per_step:,} tokens/step, device {trainer.device}, run folder {run_dir}")
    trainer.run(stop_after=stop_after, tensorboard=tensorboard)
    if not trainer.done():
        trainer.metrics.close()
        return {"step": trainer.step, "stopped_early": True}
    results = finish(trainer, tok, data_dir)
    write_json(run_dir / "results.json", results)
    return results


def finish(trainer: Trainer, tok, data_dir=None) -> dict[str, Any]:
    """Save RUN_DIR/final (model + tokenizer.json) and score every eval.final_splits split in full.

    A final perplexity that is not finite (NaN/Inf weights, an overflow) is loud: a warning naming
    the split, and `results.json` records null with the reason (newllm.files.dumps_json)."""
    import warnings

    from newllm.checkpoints.native import save_model
    from newllm.data.corpora import load_documents, load_tokens

    cfg, run_dir = trainer.cfg, trainer.run_dir
    final = run_dir / "final"
    save_model(trainer.model, final, metadata={"step": trainer.step, "tokens": trainer.tokens,
                                               "train_config": cfg.to_dict()})
    atomic_write(final / "tokenizer.json", tok.save)
    results: dict[str, Any] = {"step": trainer.step, "tokens": trainer.tokens, "train_seconds": trainer.elapsed_s,
                               "train_tokens_per_s": trainer.tokens / max(trainer.elapsed_s, 1e-9),
                               "parameters": trainer.model.num_parameters(), "skipped_steps": trainer.skipped}
    for split in cfg.eval.final_splits:
        tokens = load_tokens(cfg.data.corpus, split, tok, data_dir=data_dir, cache_dir=cfg.data.cache_dir)
        text = "\n".join(load_documents(cfg.data.corpus, split=split, data_dir=data_dir))
        res = trainer.perplexity(tokens, text=text, progress=cfg.progress)
        entry = {k: getattr(res, k) for k in ("token_ppl", "word_ppl", "bits_per_byte", "n_tokens", "n_words",
                                              "n_bytes", "nll_sum")}
        if not math.isfinite(res.nll_sum):
            warnings.warn(f"final evaluation on {split!r}: token PPL {res.token_ppl} is not finite (the model has "
                          "NaN/Inf weights or overflowed); results.json records null", RuntimeWarning, stacklevel=2)
        results[split] = entry
        trainer.metrics.log("final", trainer.step, split=split, **entry)
    trainer.metrics.plot()
    trainer.metrics.close()
    return results


def _yaml(d) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
