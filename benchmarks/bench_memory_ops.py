"""Chunkwise memory ops vs their per-token reference loops (newllm.models.ops.naive), same process.

    python benchmarks/bench_memory_ops.py                    # T = 2048, one 512-dim memory head
    python benchmarks/bench_memory_ops.py --tokens 8192 --repeats 5

Prints seconds per call and the ratio loop / chunkwise (goal for memory_scan at T = 2048: >= 30x).
With one 512-wide memory head both sides do the same ~3 GFLOP of matmuls per call; the chunkwise op
runs them as matrix-matrix products at the machine's matmul peak, so the ratio is bounded by how
much faster a GEMM is than a GEMV there. Narrower heads make the loop overhead-bound and the ratio
larger.
Both sides run the same equations in fp32 on the same inputs; the outputs are compared first so a
fast wrong op cannot report a ratio.
"""
from __future__ import annotations

import argparse

import torch

from newllm.models.ops.linear_attention import causal_linear_attention
from newllm.models.ops.memory import memory_scan
from newllm.models.ops.naive import naive_causal_linear_attention, naive_memory_scan
from _timing import best_time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--memory-shapes", nargs="+", default=["1x512", "8x64"],
                    help="HxD memory shapes: heads x (Dk = Dv); 1x512 is InfiniLayer's default at hidden 512")
    ap.add_argument("--segment-length", type=int, default=256)
    ap.add_argument("--attn-heads", type=int, default=8, help="heads of the linear-attention benchmark")
    ap.add_argument("--attn-head-dim", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={B}, T={T}")

    S, rows = args.segment_length, []
    for shape, delta in ((shape, delta) for shape in args.memory_shapes for delta in (True, False)):
        H, D = map(int, shape.split("x"))
        q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
        kw = dict(segment_length=S, delta_rule=delta)
        with torch.no_grad():
            out, _ = memory_scan(q, k, v, **kw)
            ref, _ = naive_memory_scan(q, k, v, **kw)
            err = (out - ref).abs().max().item()
            fast = best_time(lambda: memory_scan(q, k, v, **kw), args.repeats)
            slow = best_time(lambda: naive_memory_scan(q, k, v, **kw), args.repeats)
        rows.append((f"memory_scan {'delta' if delta else 'linear'} H={H} D={D} S={S}", slow, fast, err))
        print(f"  {rows[-1][0]}: {slow / fast:.1f}x", flush=True)

    H, D = args.attn_heads, args.attn_head_dim
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    with torch.no_grad():
        out, _ = causal_linear_attention(q, k, v, chunk_size=args.chunk_size)
        ref, _ = naive_causal_linear_attention(q, k, v)
        err = (out - ref).abs().max().item()
        fast = best_time(lambda: causal_linear_attention(q, k, v, chunk_size=args.chunk_size), args.repeats)
        slow = best_time(lambda: naive_causal_linear_attention(q, k, v), args.repeats)
    rows.append((f"causal_linear_attention H={H} D={D} C={args.chunk_size}", slow, fast, err))

    print(f"{'op':48s} {'loop s':>9s} {'chunk s':>9s} {'ratio':>8s} {'max|diff|':>10s}")
    for name, slow, fast, err in rows:
        print(f"{name:48s} {slow:9.4f} {fast:9.4f} {slow / fast:7.1f}x {err:10.2e}")


if __name__ == "__main__":
    main()
