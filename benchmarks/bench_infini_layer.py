"""InfiniLayer vs PythiaLayer speed, and streaming memory of the `infini` preset.

    python benchmarks/bench_infini_layer.py                         # both parts, defaults below
    python benchmarks/bench_infini_layer.py --part speed --tokens 2048 16384 4096
    python benchmarks/bench_infini_layer.py --part stream --stream-tokens 4096 65536 --window 2048

speed: forward+backward of one layer (hidden 512, Pythia-70m sizes, batch 1) at each T; prints
seconds and the ratio infini / pythia (goals: <= 1.0 at T = 2048, <= 0.3 at T = 16384). Pythia's
cost grows like T^2 (full causal softmax attention), Infini's like T (segment-local attention plus
a fixed-size memory). Beside them: the Infini layer with its memory off, and the dense matmuls both
layers share (projections and MLP), whose ratio to Pythia is the floor no mixer can go under.

stream: feeds N tokens through the whole `infini` preset in chunks, carrying the state, in a fresh
subprocess per N, and prints the peak resident memory added by streaming (the process's peak RSS
during the stream minus its RSS before it; Linux /proc) and the bytes held in the carried state. The Pythia layers of the
preset keep KV caches, which grow with the stream; they are bounded here with the `sliding_window`
override (Pythia layers attend to the last W tokens; the Infini layer needs nothing: its state is
fixed-size by construction). The ratio peak(64K) / peak(4K) is the figure (goal <= 1.1).
Each worker first streams `--warmup-chunks` chunks (from a fresh state, discarded): glibc keeps
freed activation blocks in its heap and its peak creeps up by some 40-70 MiB over the first dozen
calls whatever the stream length (heap fragmentation, not tensors the model holds). The workers
also run with glibc's mmap threshold fixed at `--mmap-threshold` bytes (MALLOC_MMAP_THRESHOLD_;
0: glibc's default, a threshold that rises to the largest block freed so far, up to 32 MiB): with
the default, whether a freed 10-30 MiB block goes back to the system depends on what was freed
before it, and the same stream measured 216 or 363 MiB from one run to the next. The state
bytes, printed beside, are the exact count of what is carried.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from newllm import create_model
from newllm.models.layers import InfiniLayer, PythiaLayer
from _timing import best_time, fwd_bwd


def speed(args):
    d, h, ff = args.hidden, args.heads, 4 * args.hidden
    print(f"forward+backward, hidden {d}, {h} heads, batch {args.batch}, segment {args.segment_length}, "
          f"{torch.get_num_threads()} threads")
    print("memory off: the same InfiniLayer with use_memory=False (block + segment-local attention, no memory);\n"
          "dense: the block's projections and MLP alone (x @ W for every weight matrix, forward+backward),\n"
          "the part both layers share; dense / pythia is the floor of infini / pythia")
    print(f"{'T':>7s} {'pythia s':>10s} {'infini s':>10s} {'mem off s':>10s} {'dense s':>9s} "
          f"{'infini/pythia':>14s} {'mem off/pythia':>15s} {'dense/pythia':>13s}")
    for T in args.tokens:
        torch.manual_seed(0)
        pythia = PythiaLayer(d, h, ff)
        infini = InfiniLayer(d, h, ff, segment_length=args.segment_length)
        off = InfiniLayer(d, h, ff, segment_length=args.segment_length, use_memory=False)
        x = torch.randn(args.batch, T, d, requires_grad=True)
        reps = args.repeats if T <= 4096 else 1
        tp = best_time(fwd_bwd(pythia, x), reps)
        ti = best_time(fwd_bwd(infini, x), reps)
        to = best_time(fwd_bwd(off, x), reps)
        td = best_time(dense_step(infini, x), reps)
        print(f"{T:7d} {tp:10.3f} {ti:10.3f} {to:10.3f} {td:9.3f} {ti / tp:13.2f}x {to / tp:14.2f}x {td / tp:12.2f}x",
              flush=True)


def dense_step(layer, x):
    """Forward+backward of every 2-D weight of `layer` applied to x alone (the matmuls a block does
    whatever its mixer: q/k/v/o and the MLP), with their biases."""
    mats = [(m.weight, m.bias) for m in layer.modules() if isinstance(m, torch.nn.Linear)]

    def step():
        total = 0.0
        for w, b in mats:
            inp = x if w.shape[1] == x.shape[-1] else x.new_ones(*x.shape[:-1], w.shape[1]).requires_grad_()
            total = total + torch.nn.functional.linear(inp, w, b).square().mean()
        total.backward()
    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def stream_worker(tokens: int, chunk: int, window: int | None, warmup_chunks: int):
    """Runs in a subprocess: prints JSON with the peak RSS added by streaming `tokens` tokens.

    The peak is the kernel's high-water mark (VmHWM) of this process, reset (write "5" to
    /proc/self/clear_refs) after the model is built and warmed up, minus the RSS at that moment.
    The warm-up streams `warmup_chunks` chunks of other tokens with their own state.
    """
    torch.manual_seed(0)
    model = create_model("infini", sliding_window=window).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)  # speed/memory only, no learning
    warm = torch.randint(0, model.config.vocab_size, (1, max(1, warmup_chunks) * chunk), generator=g)
    with torch.no_grad():
        state = None
        for a in range(0, warm.shape[1], chunk):  # warm-up: allocator heap, kernels
            state = model(warm[:, a:a + chunk], state=state).state
        state = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        base = _status_kib("VmRSS")
        for a in range(0, tokens, chunk):
            state = model(ids[:, a:a + chunk], state=state).state
        peak = _status_kib("VmHWM")
    state_bytes = sum(t.numel() * t.element_size() for s in state for t in s)
    print(json.dumps({"tokens": tokens, "peak_added": (peak - base) * 1024, "state_bytes": state_bytes}))


def stream(args):
    w = None if args.window <= 0 else args.window
    print(f"streaming the 'infini' preset in chunks of {args.chunk}, Pythia layers with sliding_window={w}, "
          f"after {args.warmup_chunks} warm-up chunks, glibc mmap threshold "
          f"{args.mmap_threshold if args.mmap_threshold > 0 else 'default (dynamic)'}")
    rows = []
    for n in args.stream_tokens:
        cmd = [sys.executable, __file__, "--stream-worker", str(n), "--chunk", str(args.chunk),
               "--window", str(args.window), "--warmup-chunks", str(args.warmup_chunks)]
        env = dict(os.environ)
        if args.mmap_threshold > 0:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        r["seconds"] = time.perf_counter() - t0
        rows.append(r)
        print(f"{n:7d} tokens: peak RSS added {r['peak_added'] / 2**20:8.1f} MiB, state {r['state_bytes'] / 2**20:7.2f} MiB"
              f" ({r['seconds']:.0f} s)", flush=True)
    first = rows[0]
    for r in rows[1:]:
        print(f"peak({r['tokens']}) / peak({first['tokens']}) = {r['peak_added'] / first['peak_added']:.2f}x, "
              f"state({r['tokens']}) / state({first['tokens']}) = {r['state_bytes'] / first['state_bytes']:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("speed", "stream", "both"), default="both")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--segment-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-tokens", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per call when streaming")
    ap.add_argument("--window", type=int, default=2048, help="Pythia layers' sliding window (<= 0: none)")
    ap.add_argument("--warmup-chunks", type=int, default=12, help="chunks streamed (and discarded) before measuring")
    ap.add_argument("--mmap-threshold", type=int, default=1 << 20,
                    help="glibc MALLOC_MMAP_THRESHOLD_ of the workers in bytes (0: glibc's dynamic default)")
    ap.add_argument("--stream-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stream_worker is not None:
        return stream_worker(args.stream_worker, args.chunk, None if args.window <= 0 else args.window,
                             args.warmup_chunks)
    if args.part in ("speed", "both"):
        speed(args)
    if args.part in ("stream", "both"):
        stream(args)


if __name__ == "__main__":
    main()
