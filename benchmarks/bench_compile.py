"""`compile: true` against eager: training tokens/s of a preset (default `pythia`, Pythia-70m sizes)
in fp32 and under bf16 autocast, the compile time, and the evaluation forward.

    python benchmarks/bench_compile.py --threads 1 --small      # d 256, 4 layers: compiles in about a minute
    python benchmarks/bench_compile.py --threads 1              # Pythia-70m sizes: compiles for minutes on a CPU
    python benchmarks/bench_compile.py --preset infini_all --small
    python benchmarks/bench_compile.py --small --bpe 8192    # configs/pythia_wikitext2_cpu.yaml's sizes

What it prints, all measured in this process:
  * the CPU, the threads, torch's version;
  * for each amp (none = fp32, bf16 = autocast): the compile time (the compiled Trainer's first step,
    next to the eager first step), how dynamo split that step (graphs, graph breaks and their
    reasons: every break is a return to Python between compiled pieces), training tokens/s of the eager and the compiled `Trainer.train_step`
    in alternating rounds (so load from other jobs hits both alike), the ratio compiled / eager, and the
    largest |loss difference| over all the steps both took from the same weights and batches;
  * the evaluation forward (no_grad, eval mode, `logits_to_keep` = a quarter of the window plus one, as
    sliding-window perplexity with stride = context / 4 calls it): its compile time, eager and compiled
    windows/s, the ratio, and the largest |logit difference| relative to the largest |logit|.
The compile times are a first compile's: inductor's cache goes to a fresh temporary folder unless
--warm-cache (then a compile this machine already did is read back, in seconds). Real text:
tiny-shakespeare through the GPT-NeoX tokenizer (../shared/tokenizers), or with --bpe N through a
byte-level BPE of N tokens trained on it (the model's vocabulary is then N). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWLLM_DATA_DIR", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_amp import SMALL, cpu_name  # noqa: E402  (the same sizes and CPU line as bench_amp.py)

AMPS = ("none", "bf16")


def dynamo_report() -> str:
    """Graphs dynamo compiled, and its graph breaks (distinct first lines of the reasons), since the
    counters were last cleared: every break is a return to Python between compiled pieces."""
    from torch._dynamo.utils import counters

    breaks = {}
    for reason, n in counters["graph_break"].items():
        line = str(reason).strip().splitlines()[0]
        breaks[line] = breaks.get(line, 0) + n
    out = f"{counters['stats']['unique_graphs']} graph(s), {sum(breaks.values())} graph break(s)"
    return out + (": " + "; ".join(f"{n} x {r}" for r, n in sorted(breaks.items())) if breaks else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pythia")
    ap.add_argument("--small", action="store_true", help="d 256, 4 layers instead of the preset's sizes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--amp", nargs="+", choices=AMPS, default=list(AMPS))
    ap.add_argument("--eval-batch", type=int, default=8, help="windows per evaluation forward")
    ap.add_argument("--eval-rounds", type=int, default=5)
    ap.add_argument("--bpe", type=int, default=None,
                    help="a byte-level BPE of this many tokens trained on the text (and the model's vocabulary)")
    ap.add_argument("--warm-cache", action="store_true", help="use inductor's usual cache (compile time: a re-read)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_compile-") as tmp:
        if not args.warm_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        run(args, Path(tmp))


def run(args, tmp: Path) -> None:
    from newllm import create_model, load_tokenizer
    from newllm.train import TrainConfig, Trainer

    text = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text()
    if args.bpe:
        from newllm.data.bpe import train_bpe

        tok = train_bpe([text], args.bpe)
    else:
        tok = load_tokenizer(SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
    tokens = np.asarray(tok.encode(text), dtype=np.int32)
    sizes = {**(SMALL if args.small else {}), **({"vocab_size": tok.vocab_size} if args.bpe else {})}

    def new_model():
        torch.manual_seed(0)
        return create_model(args.preset, **sizes)

    def trainer(amp: str, compiled: bool) -> Trainer:
        cfg = TrainConfig.from_dict(dict(
            device="cpu", seq_len=args.seq, batch_size=args.batch, grad_accum=1, max_steps=10**9, lr=6e-4,
            min_lr=6e-4, warmup_steps=0, weight_decay=0.1, grad_clip=1.0, amp=amp, compile=compiled,
            progress=False, data={"tokenizer": "unused"}, run_dir=str(tmp / "run")))
        return Trainer(cfg, new_model(), tokens)

    probe = new_model()
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; inductor cache: "
          f"{'the usual one (warm)' if args.warm_cache else 'fresh (first compiles)'}")
    print(f"`{args.preset}` preset{' (small)' if args.small else ''}: {probe.num_parameters() / 1e6:.1f}M parameters, "
          f"vocabulary {probe.config.vocab_size:,}, {args.batch} x {args.seq} tokens per step")
    del probe
    ntok = args.steps * args.batch * args.seq

    for amp in args.amp:
        torch._dynamo.reset()
        runs = {"eager": trainer(amp, False), "compiled": trainer(amp, True)}
        first, losses = {}, {k: [] for k in runs}
        for k, t in runs.items():  # the first step: the compiled one compiles forward and backward here
            torch._dynamo.utils.counters.clear()
            t0 = time.perf_counter()
            losses[k].append(t.train_step().loss)
            first[k] = time.perf_counter() - t0
        split = dynamo_report()  # of the compiled first step (the last one run)
        best = {k: float("inf") for k in runs}
        for _ in range(args.rounds):
            for k, t in runs.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    losses[k].append(t.train_step().loss)
                best[k] = min(best[k], time.perf_counter() - t0)
        gap = np.abs(np.array(losses["compiled"]) - np.array(losses["eager"]))
        words = "fp32" if amp == "none" else "bf16 autocast"
        print(f"\ntraining, amp {amp} ({words}): first step eager {first['eager']:.1f} s, compiled "
              f"{first['compiled']:.1f} s (the compile; {split}); best of {args.rounds} rounds of {args.steps} steps")
        for k in runs:
            print(f"  {k:<8}: {ntok / best[k]:8.0f} tokens/s")
        print(f"  ratio compiled / eager: {best['eager'] / best['compiled']:.2f}x; largest |loss difference| over "
              f"{len(gap)} steps: {gap.max():.2e} nats (losses {losses['eager'][0]:.4f} -> {losses['eager'][-1]:.4f})")
        del runs

    # the evaluation forward, as sliding-window perplexity calls it (fp32, no_grad, eval mode)
    torch._dynamo.reset()
    model = new_model().eval()
    compiled = torch.compile(model)
    torch._dynamo.utils.counters.clear()
    rows = tokens[: args.eval_batch * args.seq].reshape(args.eval_batch, args.seq)
    x = torch.as_tensor(rows).long()
    keep = args.seq // 4 + 1
    with torch.no_grad():
        want = model(x, logits_to_keep=keep).logits
        t0 = time.perf_counter()
        got = compiled(x, logits_to_keep=keep).logits
        compile_s = time.perf_counter() - t0
        best = {"eager": float("inf"), "compiled": float("inf")}
        for _ in range(args.eval_rounds):
            for k, f in (("eager", model), ("compiled", compiled)):
                t0 = time.perf_counter()
                f(x, logits_to_keep=keep)
                best[k] = min(best[k], time.perf_counter() - t0)
    rel = float((got - want).abs().max() / want.abs().max())
    print(f"\nevaluation forward (fp32, no_grad, {args.eval_batch} windows of {args.seq}, logits_to_keep {keep}): "
          f"compile {compile_s:.1f} s ({dynamo_report()}); best of {args.eval_rounds}")
    for k in best:
        print(f"  {k:<8}: {args.eval_batch / best[k]:8.1f} windows/s")
    print(f"  ratio compiled / eager: {best['eager'] / best['compiled']:.2f}x; largest |logit difference| / "
          f"largest |logit|: {rel:.1e}")


if __name__ == "__main__":
    main()
