"""A whole training run from a recipe: run folder, tokenizer, tokens, model, `Trainer`, final model
and final evaluation (`train()`, what `newllm train` calls).

Under torchrun (`torchrun --nproc_per_node N -m newllm train --config ...`) every rank runs `train()`:
it joins the process group first (`newllm.train.distributed.init`); rank 0 claims the run folder,
builds the tokenizer and fills the token cache before the other ranks read them; every rank builds
the same model (same seed), trains its slice of every batch, and takes part in the final
evaluation; only rank 0 writes (config.yaml, metrics, final/, results.json). See docs/distributed.md.
"""
from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from newllm.errors import NewLLMError
from newllm.files import atomic_write, write_json, write_text
from newllm.train import checkpoint as ckpt
from newllm.train import distributed
from newllm.train.config import TrainConfig, dump_yaml
from newllm.train.hardware import amp_words
from newllm.train.loop import Trainer, seed_all

#: what a run writes into its folder: a fresh run refuses a folder holding any of them (unless forced)
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "results.json", "config.yaml", "tokenizer.json",
               "loss.png", "tensorboard", "wandb")


def claim_run_dir(run_dir: Path, force: bool = False) -> None:
    """Make `run_dir` ready for a fresh run. A folder that holds a previous run's outputs is refused
    (nothing a user made is lost): resume it, choose another run_dir, or pass `force` to start over,
    which deletes those outputs (only newllm's own names, `RUN_OUTPUTS`) before anything is written."""
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
    `force` (`claim_run_dir`); so does a resume whose run_dir is another run's folder. Launched by
    torchrun with more than one process, it trains distributed (module doc).
    """
    world, created = distributed.init(cfg.device)
    try:
        return _train(cfg, world, resume, data_dir, stop_after, tensorboard, force)
    finally:
        if created:
            distributed.shutdown()


def _train(cfg, world, resume, data_dir, stop_after, tensorboard, force) -> dict[str, Any]:
    from newllm.checkpoints import load_tokenizer
    from newllm.data.corpora import load_tokens
    from newllm.train.metrics import require_backends
    from newllm.train.tbptt import trainer_class

    require_backends(cfg)
    data_dir = data_dir or cfg.data.data_dir
    folder = ckpt.find_checkpoint(resume) if resume is not None else None
    run_dir = Path(cfg.run_dir)
    source = ckpt.owning_run(folder) if folder is not None else None  # None: a checkpoint outside any run
    if source is None or source.resolve() != run_dir.resolve():
        world.agree(lambda: claim_run_dir(run_dir, force), main_only=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_all(cfg.seed)
    # rank 0 builds (or copies) the tokenizer and fills the token cache; the others then read both
    tok = world.agree(lambda: prepare_tokenizer(cfg, run_dir, data_dir, resume_from=source), main_only=True)
    if not world.is_main:
        tok = load_tokenizer(run_dir / "tokenizer.json")
    load = dict(tokenizer=tok, data_dir=data_dir, cache_dir=cfg.data.cache_dir)
    train_tokens = world.main_first(lambda: load_tokens(cfg.data.corpus, cfg.data.train_split, **load))
    valid_tokens = (world.main_first(lambda: load_tokens(cfg.data.corpus, cfg.data.valid_split, **load))
                    if cfg.eval.every else None)
    seed_all(cfg.seed)  # model init depends on the seed only, not on what tokenizing consumed
    model = build_model(cfg, tok)
    trainer = trainer_class(cfg)(cfg, model, train_tokens, valid_tokens, run_dir=run_dir)
    if folder is not None:
        trainer.load(folder)
    if world.is_main:
        write_text(run_dir / "config.yaml", dump_yaml(cfg.to_dict()))
        ranks = (f", {world.world_size} processes ({cfg.distributed}, {cfg.batch_size // world.world_size} windows "
                 "per rank per micro-batch)" if world.distributed else "")
        print(f"newllm train: {model.num_parameters():,} parameters, {len(train_tokens):,} training tokens, "
              f"{cfg.tokens_per_step:,} tokens/step, device {trainer.device}{ranks}, {amp_words(cfg.amp, trainer.amp)}, "
              f"{'compiled step (torch.compile)' if cfg.compile else 'eager step'}, run folder {run_dir}", flush=True)
    trainer.run(stop_after=stop_after, tensorboard=tensorboard)
    if not trainer.done():
        trainer.metrics.close()
        return {"step": trainer.step, "stopped_early": True}
    results = finish(trainer, tok, data_dir)
    if world.is_main:
        write_json(run_dir / "results.json", results)
    return results


def finish(trainer: Trainer, tok, data_dir=None) -> dict[str, Any]:
    """Save RUN_DIR/final (model + tokenizer.json) and score every eval.final_splits split in full.

    A final perplexity that is not finite (NaN/Inf weights, an overflow) is loud: a warning naming
    the split, and `results.json` records null with the reason (newllm.files.dumps_json). Distributed,
    every rank evaluates (an FSDP forward needs all of them) and rank 0 writes."""
    from newllm.checkpoints.native import save_model
    from newllm.data.corpora import load_documents, load_tokens

    cfg, run_dir, world = trainer.cfg, trainer.run_dir, trainer.world
    final = run_dir / "final"
    weights = distributed.full_state_dict(trainer.wrapped, world) if world.distributed else None
    if world.is_main:
        save_model(trainer.model, final, metadata={"step": trainer.step, "tokens": trainer.tokens,
                                                   "train_config": cfg.to_dict()}, state_dict=weights)
        atomic_write(final / "tokenizer.json", tok.save)
    results: dict[str, Any] = {"step": trainer.step, "tokens": trainer.tokens, "train_seconds": trainer.elapsed_s,
                               "train_tokens_per_s": trainer.tokens / max(trainer.elapsed_s, 1e-9),
                               "parameters": trainer.model.num_parameters(), "skipped_steps": trainer.skipped}
    if world.distributed:
        results["processes"] = world.world_size
    for split in cfg.eval.final_splits:
        tokens = world.main_first(lambda: load_tokens(cfg.data.corpus, split, tok, data_dir=data_dir,
                                                      cache_dir=cfg.data.cache_dir))
        text = "\n".join(load_documents(cfg.data.corpus, split=split, data_dir=data_dir))
        res = trainer.perplexity(tokens, text=text, progress=cfg.progress and world.is_main)
        entry = {k: getattr(res, k) for k in ("token_ppl", "word_ppl", "bits_per_byte", "n_tokens", "n_words",
                                              "n_bytes", "nll_sum")}
        if not math.isfinite(res.nll_sum) and world.is_main:
            warnings.warn(f"final evaluation on {split!r}: token PPL {res.token_ppl} is not finite (the model has "
                          "NaN/Inf weights or overflowed); results.json records null", RuntimeWarning, stacklevel=2)
        results[split] = entry
        trainer.metrics.log("final", trainer.step, split=split, **entry)
    trainer.metrics.plot()
    trainer.metrics.close()
    return results
