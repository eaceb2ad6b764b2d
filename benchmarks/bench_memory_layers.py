"""MultiMemoryLayer and HierarchicalLayer against InfiniLayer (same block, one memory), and the cost of
memory-state files against torch.save.

    python benchmarks/bench_memory_layers.py                        # defaults below (~1-2 min on 2 cores)
    python benchmarks/bench_memory_layers.py --tokens 2048 8192 --num-memories 4 8

layers: forward+backward of one layer (hidden 512, 8 heads, segment 256: Pythia-70m sizes, batch 1)
at each T. Prints seconds and the ratios multi / infini and hierarchical / infini: what M memories
(and, for hierarchical, the extra coarse memory and expansion gate) cost over one Infini memory.
Also the streaming decode cost (one token per call with the state carried, --decode-tokens tokens).

files: save + load of the full `hierarchical` state after --state-tokens tokens (a few MiB) with
`newllm.save_memory_state` / `load_memory_state` (safetensors + JSON header + sha256 of the bytes)
against `torch.save` / `torch.load(weights_only=True)` of the same tensors: the price of the
integrity check and the self-describing header.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from newllm import create_model, load_memory_state, save_memory_state
from newllm.models.layers import HierarchicalLayer, InfiniLayer, MultiMemoryLayer
from _timing import best_time, fwd_bwd


def decode(layer, x):
    @torch.no_grad()
    def step():
        state = None
        for t in range(x.shape[1]):
            _, state = layer(x[:, t:t + 1], state)
    return step


def layers(args):
    d, h, ff, S = args.hidden, args.heads, 4 * args.hidden, args.segment_length
    print(f"forward+backward, hidden {d}, {h} heads, batch 1, segment {S}, {torch.get_num_threads()} threads")
    print(f"{'T':>7s} {'M':>3s} {'infini s':>10s} {'multi s':>10s} {'hier s':>10s} {'multi/infini':>13s} "
          f"{'hier/infini':>12s}")
    for T in args.tokens:
        x = torch.randn(1, T, d)
        torch.manual_seed(0)
        t_inf = best_time(fwd_bwd(InfiniLayer(d, h, ff, segment_length=S), x), args.repeats)
        for M in args.num_memories:
            torch.manual_seed(0)
            t_mul = best_time(fwd_bwd(MultiMemoryLayer(d, h, ff, segment_length=S, num_memories=M), x), args.repeats)
            t_hie = best_time(fwd_bwd(HierarchicalLayer(d, h, ff, segment_length=S, num_memories=M), x), args.repeats)
            print(f"{T:7d} {M:3d} {t_inf:10.3f} {t_mul:10.3f} {t_hie:10.3f} {t_mul / t_inf:13.2f} {t_hie / t_inf:12.2f}")
    n = args.decode_tokens
    x = torch.randn(1, n, d)
    print(f"\ndecode {n} tokens one at a time (state carried, no grad)")
    t_inf = best_time(decode(InfiniLayer(d, h, ff, segment_length=S), x), 1)
    for M in args.num_memories:
        t_mul = best_time(decode(MultiMemoryLayer(d, h, ff, segment_length=S, num_memories=M), x), 1)
        t_hie = best_time(decode(HierarchicalLayer(d, h, ff, segment_length=S, num_memories=M), x), 1)
        print(f"  M={M}: infini {1e3 * t_inf / n:.2f} ms/token, multi {t_mul / t_inf:.2f}x, "
              f"hierarchical {t_hie / t_inf:.2f}x")


def files(args):
    torch.manual_seed(0)
    model = create_model("hierarchical").eval()
    with torch.no_grad():
        for a in range(0, args.state_tokens, 512):
            model(torch.arange(a, min(a + 512, args.state_tokens))[None], update_memory=True)
    state = model.get_memory_state()
    tensors = {k: t.contiguous() for k, t in state.named_tensors().items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = os.path.join(tmp, "m.safetensors"), os.path.join(tmp, "m.pt")

        def ours_rt():
            save_memory_state(state, ours)
            load_memory_state(ours)

        def ref_rt():
            torch.save(tensors, ref)
            torch.load(ref, weights_only=True)

        t_ours, t_ref = best_time(ours_rt, args.repeats), best_time(ref_rt, args.repeats)
    print(f"\nhierarchical preset state after {args.state_tokens} tokens: {size / 2**20:.2f} MiB")
    print(f"save+load: newllm {t_ours * 1e3:.1f} ms, torch.save/load {t_ref * 1e3:.1f} ms, ratio {t_ours / t_ref:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["layers", "files", "all"], default="all")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--num-memories", type=int, nargs="+", default=[4])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--segment-length", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--state-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.part in ("layers", "all"):
        layers(args)
    if args.part in ("files", "all"):
        files(args)


if __name__ == "__main__":
    main()
