"""Training tokens/s of 2 gloo processes (DDP or FSDP2) against 1 process, same global batch, this machine.

    python benchmarks/bench_distributed.py                       # d=256, 4 layers, vocab 8192, global batch 8 x 128
    python benchmarks/bench_distributed.py --kind fsdp --steps 5 --rounds 3
    python benchmarks/bench_distributed.py --threads-per-rank 4 --procs 4     # a larger machine

The step is `Trainer.train_step` (the real loop: batch sampling, forward, backward, gradient
all-reduce, clipping, schedule, AdamW) on tiny-shakespeare through a byte-level BPE. The 2-process
run is two processes started with torch.multiprocessing spawn and joined by gloo on this machine,
each reading its half of every global batch of the 1-process run. Before anything is timed, the
first-step losses of both are compared (equal to ~1e-7: the same global batch), so a fast run that
trains on other data cannot report a ratio.

Reported: the 1-process run with 1 thread and with all the threads the ranks use together, the
2-process run, and the ratios (tokens/s of 2 processes / 1 process; > 1: 2 processes faster). On a
2-core CPU two processes of 1 thread compete for the same two cores as one process of 2 threads, and
add the gradient all-reduce over loopback, so the honest comparison is against 1 process x 2 threads;
a ratio near 1 there means the distributed path costs little, not that it speeds CPU training up.
Timing: after --warmup steps, --rounds rounds of --steps steps each; the best round of each setup
is reported. Nothing is asserted about time.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWLLM_DATA_DIR", ROOT.parent / "shared"))
MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)


def tokens_and_vocab(vocab: int):
    from newllm.data.bpe import train_bpe

    text = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text()[:400_000]
    tok = train_bpe([text], vocab)
    return tok.encode(text), tok.vocab_size


def make_trainer(args, tokens, vocab, run_dir):
    from newllm import create_model
    from newllm.train import TrainConfig, Trainer

    cfg = TrainConfig.from_dict(dict(
        device="cpu", seq_len=args.seq, batch_size=args.batch, grad_accum=args.grad_accum, max_steps=10**9,
        lr=1e-4, min_lr=1e-4, warmup_steps=0, progress=False, data={"tokenizer": "unused"}, run_dir=str(run_dir),
        distributed=args.kind))
    torch.manual_seed(0)
    return Trainer(cfg, create_model("pythia", vocab_size=vocab, **MODEL), tokens)


def timed_rounds(trainer, args) -> tuple[float, float]:
    """(first-step loss, best seconds of --rounds rounds of --steps steps); collective-safe under DDP."""
    world = trainer.world
    first = trainer.train_step().loss
    for _ in range(args.warmup - 1):
        trainer.train_step()
    best = float("inf")
    for _ in range(args.rounds):
        world.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        best = min(best, world.max(time.perf_counter() - t0))  # a step ends when the slowest rank is done
    return first, best


def rank_main(rank: int, world_size: int, port: int, args, tokens, vocab, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads_per_rank)
    from newllm.train import distributed

    distributed.init("cpu")
    try:
        trainer = make_trainer(args, tokens, vocab, Path(out) / "run")
        first, best = timed_rounds(trainer, args)
        if rank == 0:
            (Path(out) / "result.json").write_text(json.dumps({"first": first, "best": best}))
    finally:
        distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="global micro-batch (windows); each rank takes batch / procs")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    tokens, vocab = tokens_and_vocab(args.vocab)
    ntok = args.steps * args.batch * args.seq * args.grad_accum
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_distributed-") as d:
        for threads in sorted({1, args.procs * args.threads_per_rank}):
            torch.set_num_threads(threads)
            trainer = make_trainer(args, tokens, vocab, Path(d) / f"one-{threads}")
            results[f"1 process x {threads} thread{'s' if threads > 1 else ''}"] = timed_rounds(trainer, args)
            del trainer
        mp.spawn(rank_main, args=(args.procs, free_port(), args, tokens, vocab, d), nprocs=args.procs, join=True)
        r = json.loads((Path(d) / "result.json").read_text())
    one_first = next(iter(results.values()))[0]
    print(f"first-step loss: 1 process {one_first:.6f}  {args.procs} processes {r['first']:.6f}  "
          f"|diff| {abs(one_first - r['first']):.1e}")
    if abs(one_first - r["first"]) > 1e-5 * abs(one_first):
        raise SystemExit("first-step losses differ: the runs did not train on the same global batch; no timing reported")
    multi = f"{args.procs} processes x {args.threads_per_rank} thread ({args.kind}, gloo)"
    results[multi] = (r["first"], r["best"])
    from newllm import create_model

    n_params = create_model("pythia", vocab_size=vocab, **MODEL).num_parameters()
    print(f"model: d={MODEL['hidden_size']} layers={MODEL['num_hidden_layers']} vocab={vocab} ({n_params / 1e6:.1f}M "
          f"params); global batch {args.batch} x {args.seq} tokens x grad_accum {args.grad_accum}; "
          f"{os.cpu_count()} CPUs")
    for name, (_, best) in results.items():
        print(f"{name:>42}: {ntok / best:9.0f} tokens/s  (best of {args.rounds} rounds of {args.steps} steps)")
    for name, (_, best) in results.items():
        if name != multi:
            print(f"ratio {args.procs} processes / {name}: {best / r['best']:.2f}x")


if __name__ == "__main__":
    main()
