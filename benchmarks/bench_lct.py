"""Lagged Cache Training vs exact sequential training of context_pythia, same data, model and steps.

For each mode the same model (same seed, same init) is trained on the same windows of real text in
the same order with the same optimizer, for the same number of epochs:

* sequential: the exact recurrence, token by token, gradients through it (the baseline);
* lct-k: LCT with k refresh sweeps (k = 0 is the seed's method);
* pythia (reference, with --reference): the same model without the feedback, trained in parallel:
  the limit of LCT's cost (one parallel pass per step); its ratio to every lct-k is printed.

The modes' steps are interleaved (batch b of every mode, then batch b+1), so on a shared machine
every mode sees the same background load; training is deterministic, so this changes no result.

Printed: seconds per epoch of training steps (staleness measurements and evaluation excluded), the
speed ratio against sequential, the exact-recurrence validation perplexity of every model
(disjoint windows of seq_len tokens from an empty state, as in training), its ratio against
sequential, and the LCT staleness curve (mean |h_cached - h_exact| over training), also saved as
PNG + JSON in --out. Nothing is asserted: the figures depend on the machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lct.py                 # defaults: a few minutes
    .venv/bin/python benchmarks/bench_lct.py --train-tokens 400000 --epochs 4 --hidden 128 --sweeps 0 1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from newllm import create_model
from newllm.data.bpe import train_bpe
from newllm.data.corpora import load_documents
from newllm.eval.perplexity import sliding_window_perplexity
from newllm.train.lct import LCTConfig, make_cache, step_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="tinyshakespeare")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--bpe-vocab", type=int, default=512, help="byte-level BPE trained on the training split")
    p.add_argument("--train-tokens", type=int, default=65536, help="prefix of the training split used")
    p.add_argument("--valid-tokens", type=int, default=16384, help="prefix of the validation split scored")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--proj-init-std", type=float, default=None,
                   help="std of W_c's init (None: the preset's initializer_range / sqrt(d); 0: start without feedback)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--sweeps", type=int, nargs="+", default=[0], help="LCT refresh_sweeps values to run")
    p.add_argument("--warmup-sweeps", type=int, default=1, help="LCT warm-up sweeps for a sample seen first")
    p.add_argument("--staleness-every", type=int, default=8, help="steps between staleness measurements")
    p.add_argument("--reference", action="store_true", help="also train plain pythia (no feedback) in parallel")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/out/lct")
    return p.parse_args(argv)


def load_data(args):
    train_text = "\n".join(load_documents(args.corpus, split="train", data_dir=args.data_dir))
    valid_text = "\n".join(load_documents(args.corpus, split="valid", data_dir=args.data_dir))
    tok = train_bpe([train_text], args.bpe_vocab)
    train = torch.tensor(tok.encode(train_text)[: args.train_tokens], dtype=torch.long)
    valid = torch.tensor(tok.encode(valid_text)[: args.valid_tokens], dtype=torch.long)
    n = train.numel() // args.seq_len
    windows = train[: n * args.seq_len].view(n, args.seq_len)  # disjoint windows; sample id = row
    return tok, windows, valid


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(h))


class Run:
    """One mode's model, optimizer and LCT cache (same seed, so the same initial weights for every mode)."""

    def __init__(self, name: str, args, vocab: int):
        self.name = name
        preset = "pythia" if name == "pythia" else "context_pythia"
        self.mode = "parallel" if name == "pythia" else ("sequential" if name == "sequential" else "lct")
        torch.manual_seed(args.seed)
        self.model = create_model(preset, vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                                  **({} if preset == "pythia" else
                                     {"context_feedback": {"init": "learned", "proj_init_std": args.proj_init_std}}))
        self.cfg = LCTConfig(refresh_sweeps=int(name.split("-")[1]) if self.mode == "lct" else 0,
                             warmup_sweeps=args.warmup_sweeps, staleness_every=args.staleness_every)
        self.cache = make_cache(self.model, self.cfg) if self.mode == "lct" else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.epoch_s, self.losses, self.stale = [], [], []

    def step(self, ids: torch.Tensor, sample_ids: torch.Tensor, step: int, lr: float) -> float:
        """One optimizer step; returns its seconds (staleness measurement excluded)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        measure = self.mode == "lct" and self.cfg.staleness_every > 0 and step % self.cfg.staleness_every == 0
        self.model.train()
        t0 = time.perf_counter()
        info = step_loss(self.mode, self.model, ids, sample_ids, self.cache, self.cfg, measure_staleness=measure)
        info.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        spent = time.perf_counter() - t0 - info.measure_s
        self.losses.append(float(info.loss.detach()))
        if measure:
            self.stale.append({"step": step, "staleness": info.staleness, "cached": info.staleness_cached,
                               "relative": info.staleness_rel})
        return spent


def train_all(names: list[str], args, vocab: int, windows: torch.Tensor, valid: torch.Tensor) -> list[dict]:
    """Train every mode on the same batches; steps are interleaved (batch b of every mode, then b+1), so
    on a shared machine all modes see the same background load."""
    runs = [Run(n, args, vocab) for n in names]
    steps_per_epoch = windows.shape[0] // args.batch_size
    total = steps_per_epoch * args.epochs
    step = 0
    for epoch in range(args.epochs):
        order = epoch_order(args.seed, epoch, windows.shape[0])
        spent = [0.0] * len(runs)
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) * (0.55 + 0.45 * math.cos(math.pi * step / total))
            for i, r in enumerate(runs):
                spent[i] += r.step(windows[idx], idx, step, lr)
            step += 1
        for r, s in zip(runs, spent):
            r.epoch_s.append(s)
            print(f"  {r.name:>10s} epoch {epoch + 1}: {s:7.2f} s, last train loss {r.losses[-1]:.3f}", flush=True)
    results = []
    for r in runs:
        r.model.eval()
        ppl = sliding_window_perplexity(r.model, valid, context=args.seq_len, stride=args.seq_len,
                                        batch_size=32, progress=False)
        results.append({"name": r.name, "epoch_s": r.epoch_s, "steps": step,
                        "final_train_loss": sum(r.losses[-10:]) / len(r.losses[-10:]),
                        "valid_ppl": ppl.token_ppl, "valid_tokens": ppl.n_tokens, "staleness": r.stale})
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tok, windows, valid = load_data(args)
    print(f"bench_lct: {args.corpus}, BPE {tok.vocab_size}, {windows.shape[0]} training windows of {args.seq_len} "
          f"tokens, batch {args.batch_size}, {args.epochs} epochs, d={args.hidden} x {args.layers} layers, "
          f"{args.threads} thread(s), torch {torch.__version__}", flush=True)
    names = ["sequential", *[f"lct-{k}" for k in args.sweeps], *(["pythia"] if args.reference else [])]
    results = train_all(names, args, tok.vocab_size, windows, valid)
    seq = results[0]

    def per_epoch(r, steady: bool) -> float:
        e = r["epoch_s"][1:] if steady and len(r["epoch_s"]) > 1 else r["epoch_s"]
        return sum(e) / len(e)

    print(f"\n{'mode':>12s} {'s/epoch':>8s} {'speedup':>8s} {'s/epoch 1':>10s} {'s/epoch 2+':>11s} "
          f"{'speedup 2+':>11s} {'valid PPL (exact)':>18s} {'PPL / seq':>9s}")
    for r in results:
        print(f"{r['name']:>12s} {per_epoch(r, False):8.2f} {per_epoch(seq, False) / per_epoch(r, False):7.1f}x "
              f"{r['epoch_s'][0]:10.2f} {per_epoch(r, True):11.2f} {per_epoch(seq, True) / per_epoch(r, True):10.1f}x "
              f"{r['valid_ppl']:18.2f} {r['valid_ppl'] / seq['valid_ppl']:9.3f}")
    print("(s/epoch: all epochs; epoch 1 includes the LCT cache warm-up; 2+: the later epochs)")
    ref = next((r for r in results if r["name"] == "pythia"), None)
    if ref is not None:  # the limit: one plain parallel pass per step, no feedback, no cache
        print("\nagainst the plain parallel pass (pythia, the same sizes without W_c; goal for LCT <= 1.15x):")
        for r in results:
            if r["name"].startswith("lct"):
                print(f"  {r['name']:>10s} / pythia: all epochs {per_epoch(r, False) / per_epoch(ref, False):.2f}x, "
                      f"epochs 2+ {per_epoch(r, True) / per_epoch(ref, True):.2f}x")
    for r in results:
        if r["staleness"]:
            print(f"\nstaleness of {r['name']} (mean |h_cached - h_exact|; relative to mean |h_exact|):")
            for s in r["staleness"]:
                print(f"  step {s['step']:5d}: fed {s['staleness']:.4f} (cache as stored {s['cached']:.4f}), "
                      f"relative {s['relative']:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_lct.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    plot(results, out / "staleness.png")
    print(f"\nwrote {out / 'bench_lct.json'} and {out / 'staleness.png'}")
    return 0


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r["staleness"]:
            ax.plot([s["step"] for s in r["staleness"]], [s["staleness"] for s in r["staleness"]], label=r["name"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean |h_cached - h_exact|")
    ax.set_title("LCT staleness (context fed vs exact recurrence)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
