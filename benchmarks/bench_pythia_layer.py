"""PythiaLayer vs transformers' GPTNeoXLayer: forward + backward, same weights, same process.

    python benchmarks/bench_pythia_layer.py                          # B = 1, 4; T = 512, 2048
    python benchmarks/bench_pythia_layer.py --batch 1 2 4 --tokens 512 1024 2048 --repeats 9
    python benchmarks/bench_pythia_layer.py --reference eager        # against the eager attention path

Pythia-70m sizes (hidden 512, 8 heads, intermediate 2048, rotary_pct 0.25), fp32. One step is
`y = layer(x); y.backward(w)` with gradients for the input and every weight. transformers' step
includes its rotary-embedding module (cos/sin for the positions), since our layer computes its
cos/sin inside the call; its attention is SDPA (what `from_pretrained` picks by default) unless
--reference eager. Outputs and input gradients are compared first, so a fast wrong layer cannot
report a ratio. The two sides alternate within each repeat (a noisy neighbour slows both alike),
and the median of --repeats steps after --warmup steps is reported. ratio = ours / theirs: below
1 means we are faster.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

from newllm.models.layers import PythiaLayer

def build(args):
    cfg = transformers.GPTNeoXConfig(hidden_size=args.hidden, num_attention_heads=args.heads,
                                     intermediate_size=args.intermediate, rotary_pct=args.rotary_pct,
                                     use_parallel_residual=True)
    cfg._attn_implementation = args.reference
    torch.manual_seed(0)
    ref = GPTNeoXLayer(cfg, layer_idx=0)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    ours = PythiaLayer(args.hidden, args.heads, args.intermediate, rotary_pct=args.rotary_pct)
    ours.load_state_dict(ref.state_dict(), strict=True)  # our layer carries transformers' names
    return ours, ref, GPTNeoXRotaryEmbedding(cfg)


def steps(ours, ref, rope, B, T, d):
    g = torch.Generator().manual_seed(B * 100003 + T)
    x = torch.randn(B, T, d, generator=g)
    w = torch.randn(B, T, d, generator=g)
    xo = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    pos = torch.arange(T)[None]
    # transformers only builds the causal mask in GPTNeoXModel; a lone layer needs it explicitly for eager
    mask = None if ref.attention.config._attn_implementation == "sdpa" else torch.full((T, T), float("-inf")).triu(1)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        xo.grad = None
        y, _ = ours(xo)
        y.backward(w)
        return y

    def step_ref():
        ref.zero_grad(set_to_none=True)
        xr.grad = None
        y = ref(xr, attention_mask=mask, position_embeddings=rope(xr, pos))
        y.backward(w)
        return y

    return step_ours, step_ref, xo, xr


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--rotary-pct", type=float, default=0.25)
    ap.add_argument("--reference", choices=["sdpa", "eager"], default="sdpa", help="transformers' attention path")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, ref, rope = build(args)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"hidden {args.hidden}, {args.heads} heads, intermediate {args.intermediate}, rotary_pct {args.rotary_pct}, "
          f"reference attention {args.reference}; median of {args.repeats} fwd+bwd steps")
    print(f"{'B':>3s} {'T':>6s} {'ours s':>9s} {'theirs s':>9s} {'ours/theirs':>12s} {'max|dy|':>9s} {'max|dx|':>9s}")
    ratios = []
    for T in args.tokens:
        for B in args.batch:
            step_ours, step_ref, xo, xr = steps(ours, ref, rope, B, T, args.hidden)
            dy = (step_ours() - step_ref()).abs().max().item()
            dx = (xo.grad - xr.grad).abs().max().item()
            if dy > 1e-4 or dx > 1e-3:
                raise SystemExit(f"outputs differ (max |dy| {dy:.2e}, max |dx| {dx:.2e}): not timing a wrong layer")
            for _ in range(args.warmup):
                step_ours(), step_ref()
            t_ours, t_ref = [], []
            for _ in range(args.repeats):
                t_ours.append(timed(step_ours))
                t_ref.append(timed(step_ref))
            a, b = statistics.median(t_ours), statistics.median(t_ref)
            ratios.append(a / b)
            print(f"{B:3d} {T:6d} {a:9.4f} {b:9.4f} {a / b:11.2f}x {dy:9.1e} {dx:9.1e}", flush=True)
    print(f"geometric mean ours/theirs: {statistics.geometric_mean(ratios):.2f}x")


if __name__ == "__main__":
    main()
