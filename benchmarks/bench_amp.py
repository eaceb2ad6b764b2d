"""`amp: auto` against fp32: training tokens/s of the `pythia` preset, MFU, and the loss curve.

    python benchmarks/bench_amp.py                          # Pythia-70m sizes, 4 x 256 tokens per step
    python benchmarks/bench_amp.py --small --curve 200 --plot docs/img/amp_loss.png

What it prints, all measured in this process:
  * the CPU (lscpu model name, its bf16 flags) and what `amp: auto` resolves to here;
  * the matmul peak of each dtype: GFLOP/s of a 2048^3 matmul, best of a few (fp32, and bf16);
  * training tokens/s of the `pythia` preset with amp none (fp32) and with amp auto, in alternating
    rounds (so load from other jobs hits both alike), the ratio auto / fp32, and each one's MFU:
    6 x N x tokens/s over the measured matmul peak of the dtype in use (N: the parameters in
    matmuls, all but the untied input embedding, which is a lookup);
  * with --curve N: N training steps of each from the same weights and batches, the largest gap
    between their 20-step mean losses, and (--plot) both curves.
Real text: tiny-shakespeare through the GPT-NeoX tokenizer (../shared/tokenizers). Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWLLM_DATA_DIR", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))

SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but an untied input embedding (a lookup),
    the N of MFU = 6 N tokens/s / peak."""
    n = model.num_parameters()
    emb, head = model.embed.weight, getattr(model.lm_head, "weight", None)
    return n if head is emb else n - emb.numel()


def main(argv=None):
    from newllm.train import TrainConfig, Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="d 256, 4 layers instead of Pythia-70m's sizes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--curve", type=int, default=0, help="also train this many steps of each and compare losses")
    ap.add_argument("--plot", type=Path, default=None, help="write the two loss curves here (PNG)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--loss-chunk", type=int, nargs="+", default=[TrainConfig.loss_chunk],
                    help="TrainConfig.loss_chunk values to time (0: whole logits + F.cross_entropy)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from newllm import create_model, load_tokenizer
    from newllm.train.hardware import BF16_CPU_FLAGS, cpu_flags, resolve_amp

    auto = resolve_amp("auto", torch.device("cpu"))
    have = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    print(f"CPU {cpu_name()}, {torch.get_num_threads()} threads; bf16 flags: {', '.join(have) or 'none'}; "
          f"amp auto -> {auto} ({'bf16 autocast' if auto == 'bf16' else 'fp32'})")
    peak = {"none": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048^3): fp32 {peak['none']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
          f"({peak['bf16'] / peak['none']:.2f}x)")

    tok = load_tokenizer(SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
    text = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text()
    tokens = np.asarray(tok.encode(text), dtype=np.int32)
    sizes = SMALL if args.small else {}

    def trainer(amp: str, loss_chunk: int = TrainConfig.loss_chunk) -> Trainer:
        torch.manual_seed(0)
        model = create_model("pythia", **sizes)
        cfg = TrainConfig.from_dict(dict(
            device="cpu", seq_len=args.seq, batch_size=args.batch, grad_accum=1, max_steps=10**9, lr=6e-4,
            min_lr=6e-4, warmup_steps=0, weight_decay=0.1, grad_clip=1.0, amp=amp, progress=False,
            loss_chunk=loss_chunk, data={"tokenizer": "unused"}, run_dir=tempfile.mkdtemp(prefix="bench_amp-")))
        return Trainer(cfg, model, tokens)

    runs = {(amp, c): trainer(amp, c) for c in args.loss_chunk for amp in ("none", "auto")}
    n_params = matmul_params(next(iter(runs.values())).model)
    for t in runs.values():
        t.train_step()  # warm-up
    best = {k: float("inf") for k in runs}
    for _ in range(args.rounds):
        for k, t in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                t.train_step()
            best[k] = min(best[k], time.perf_counter() - t0)
    ntok = args.steps * args.batch * args.seq
    print(f"\n`pythia` preset{' (small)' if args.small else ''}: {next(iter(runs.values())).model.num_parameters() / 1e6:.1f}M "
          f"parameters ({n_params / 1e6:.1f}M in matmuls: the N of MFU), "
          f"{args.batch} x {args.seq} tokens per step, best of {args.rounds} rounds of {args.steps} steps")
    for (k, c), t in best.items():
        used = runs[k, c].amp
        tps = ntok / t
        mfu = 6 * n_params * tps / (peak[used] * 1e9)
        print(f"  amp {k:<5} ({'bf16 autocast' if used == 'bf16' else 'fp32':>13}), loss_chunk {c:>4}: {tps:8.0f} "
              f"tokens/s, MFU {mfu:.1%} of the {'bf16' if used == 'bf16' else 'fp32'} matmul peak")
    for c in args.loss_chunk:
        print(f"  ratio auto / fp32, loss_chunk {c}: {best['none', c] / best['auto', c]:.2f}x")
    if len(args.loss_chunk) > 1:
        c0 = args.loss_chunk[0]
        for c in args.loss_chunk[1:]:
            print(f"  loss_chunk {c} against {c0}: fp32 {best['none', c0] / best['none', c]:.2f}x, "
                  f"auto {best['auto', c0] / best['auto', c]:.2f}x")

    if args.curve:
        curves = {}
        for k in ("none", "auto"):
            t = trainer(k)
            curves[k] = np.array([t.train_step().loss for _ in range(args.curve)])
        w = 20 if args.curve >= 40 else 1
        m = {k: c[: len(c) // w * w].reshape(-1, w).mean(1) for k, c in curves.items()}
        gap = np.abs(m["auto"] - m["none"])
        print(f"\nloss over {args.curve} steps (means of {w}): fp32 {m['none'][0]:.3f} -> {m['none'][-1]:.3f}, "
              f"auto {m['auto'][0]:.3f} -> {m['auto'][-1]:.3f}; largest gap {gap.max():.4f} nats, "
              f"final gap {gap[-1]:.4f} ({gap[-1] / m['none'][-1]:.2%})")
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4))
            for k, c in curves.items():
                ax.plot(np.arange(1, len(c) + 1), c, label=f"amp {k} ({resolve_amp(k, torch.device('cpu'))})",
                        alpha=0.8)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (nats)")
            ax.set_title(f"pythia preset{' (small)' if args.small else ''}: fp32 vs amp auto, {cpu_name()}")
            ax.legend()
            fig.tight_layout()
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.plot, dpi=100)
            print(f"curves: {args.plot}")


if __name__ == "__main__":
    main()
