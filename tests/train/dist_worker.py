"""Helpers of tests/train/test_distributed.py: start N gloo processes on this machine (torch.multiprocessing
spawn, a free port, a deadline so a hang fails the test instead of blocking CI), and the scenarios the
ranks run. Each rank writes what the test checks into OUT/NAME-rank{r}.safetensors (parameters) and
OUT/NAME-rank{r}.json (per-step losses, steps, counters)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

#: seconds a group of ranks may take before the test calls it a hang (generous: 2 shared cores)
DEADLINE_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, nprocs: int, *args, deadline_s: float = DEADLINE_S) -> None:
    """Run `scenario(rank, *args)` (a function of this module) in `nprocs` processes joined by gloo.
    A rank's exception fails the call; ranks still running after `deadline_s` are killed and the call
    fails with "hang"."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(_entry, args=(nprocs, free_port(), scenario, args), nprocs=nprocs, join=False)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(end - time.monotonic(), 0.1)):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"{scenario}: the ranks did not finish within {deadline_s} s (a hang)")


def _entry(rank: int, world: int, port: int, scenario: str, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from newllm.train import distributed

    distributed.init("cpu")
    try:
        globals()[scenario](rank, *args)
    finally:
        distributed.shutdown()


# ---------------------------------------------------------------------- what the ranks run
def make_model(vocab: int, model_kw: dict, seed: int = 0):
    from newllm import create_model

    torch.manual_seed(seed)
    kw = dict(model_kw)
    return create_model(kw.pop("preset", "pythia"), vocab_size=vocab, **kw)


def dump(out: Path, name: str, rank: int, trainer, **extra) -> None:
    from safetensors.torch import save_file

    from newllm.train import distributed

    params = {n: distributed.full_value(p.detach()).contiguous() for n, p in trainer.model.named_parameters()}
    save_file(params, str(out / f"{name}-rank{rank}.safetensors"))
    losses = [r["loss"] for r in trainer.metrics.records if r["kind"] == "train"]
    info = {"losses": losses, "step": trainer.step, "skipped": trainer.skipped, "epoch": trainer.epoch,
            "index": trainer.index, **extra}
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(info))


def train_runs(rank: int, out: str, tokens, vocab: int, runs: list) -> None:
    """For each (name, cfg dict, stop_at, model kwargs, resume fields): train from scratch; with stop_at,
    stop there (the run ends with a checkpoint), then resume a differently initialised model from it
    (its config edited by the resume fields, as `--resume --set` does) and finish."""
    from newllm.train import TrainConfig
    from newllm.train.checkpoint import find_checkpoint
    from newllm.train.tbptt import trainer_class

    out = Path(out)
    for name, cfg_dict, stop_at, model_kw, resume_fields in runs:
        cfg = TrainConfig.from_dict(cfg_dict)
        t = trainer_class(cfg)(cfg, make_model(vocab, model_kw), tokens)
        t.run(stop_after=stop_at, tensorboard=False)
        if stop_at is not None:
            first = [r["loss"] for r in t.metrics.records if r["kind"] == "train"]
            t.metrics.close()
            torch.manual_seed(123 + rank)  # fresh weights and RNG: everything must come from the checkpoint
            cfg = TrainConfig.from_dict({**cfg_dict, **resume_fields})
            t = trainer_class(cfg)(cfg, make_model(vocab, model_kw, seed=7 + rank), tokens)
            t.load(find_checkpoint(cfg.run_dir))
            t.run(tensorboard=False)
            dump(out, name, rank, t, first=first)
        else:
            dump(out, name, rank, t)
        t.metrics.close()


def edge_cases(rank: int, out: str, tokens, vocab: int, model_kw: dict, nan_cfg: dict, budget_cfg: dict,
               sync_cfg: dict) -> None:
    nan_on_rank1(rank, out, tokens, vocab, model_kw, nan_cfg, bad_step=2)
    ddp_syncs(rank, out, tokens, vocab, model_kw, sync_cfg)
    time_budget(rank, out, tokens, vocab, model_kw, budget_cfg)  # last: it replaces the loop's clock on rank 1


def ddp_syncs(rank: int, out: str, tokens, vocab: int, model_kw: dict, cfg_dict: dict) -> None:
    """Which micro-batch's backward DDP all-reduced gradient buckets in (a comm hook records it)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from newllm.train import Trainer, TrainConfig

    class Recording(Trainer):
        def batch_loss(self, x, micro):
            self.micro = micro
            return super().batch_loss(x, micro)

    cfg = TrainConfig.from_dict(cfg_dict)
    t = Recording(cfg, make_model(vocab, model_kw), tokens)
    fired = []

    def hook(state, bucket):
        fired.append(t.micro)
        return allreduce_hook(None, bucket)

    t.net.register_comm_hook(None, hook)
    t.run(tensorboard=False)
    dump(Path(out), "sync", rank, t, fired=fired)
    t.metrics.close()


def time_budget(rank: int, out: str, tokens, vocab: int, model_kw: dict, cfg_dict: dict) -> None:
    """Rank 1's clock runs 10 s per reading, rank 0's is the real one: only rank 1 alone would reach
    the budget; both must stop at the same step."""
    import newllm.train.loop as loop
    from newllm.train import Trainer, TrainConfig

    if rank == 1:
        class FastClock:
            now = 0.0

            @classmethod
            def perf_counter(cls) -> float:
                cls.now += 10.0
                return cls.now

        loop.time = FastClock
    cfg = TrainConfig.from_dict(cfg_dict)
    t = Trainer(cfg, make_model(vocab, model_kw), tokens)
    t.run(tensorboard=False)
    dump(Path(out), "budget", rank, t, elapsed_s=t.elapsed_s, done=t.done())
    t.metrics.close()


def nan_on_rank1(rank: int, out: str, tokens, vocab: int, model_kw: dict, cfg_dict: dict, bad_step: int) -> None:
    """At step `bad_step` rank 1's loss value is NaN while its gradients stay finite (a NaN constant
    added to the loss): a rank deciding alone would skip on rank 1 and step on rank 0."""
    from newllm.train import Trainer, TrainConfig

    class NaNTrainer(Trainer):
        def batch_loss(self, x, micro):
            loss = super().batch_loss(x, micro)
            if rank == 1 and self.step + 1 == bad_step:
                loss = loss + torch.tensor(float("nan"))
            return loss

    cfg = TrainConfig.from_dict(cfg_dict)
    t = NaNTrainer(cfg, make_model(vocab, model_kw), tokens)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.run(tensorboard=False)
    dump(Path(out), "nan", rank, t, warned=[str(w.message) for w in caught if "non-finite" in str(w.message)])
    t.metrics.close()
