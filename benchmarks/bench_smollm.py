"""SmolLM2-135M-Instruct (Q4_1 GGUF): newllm vs transformers' GGUF loading, same process, same text.

    python benchmarks/bench_smollm.py                       # 512-token prefill, 32 decoded tokens
    python benchmarks/bench_smollm.py --tokens 2048 --decode 128 --repeats 5 --threads 2

Measures (best of --repeats, after one warm-up for the forward passes):
  load      file -> ready float32 model (newllm: GGUFReader + our dequantizers; transformers:
            AutoModelForCausalLM.from_pretrained(folder, gguf_file=...), gguf-py's dequantizers)
  dequant   every tensor of the file: our torch dequantizers vs gguf.quants.dequantize
  prefill   one forward pass over --tokens tokens of tiny-shakespeare (tokens/s)
  decode    greedy generation of --decode tokens with the KV cache (tokens/s)
and prints each ratio newllm / transformers as a speed-up (> 1: newllm faster). The logits of the
two models are compared first, so a fast wrong model cannot report a ratio.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWLLM_DATA_DIR", ROOT.parent / "shared"))


def best_time(fn, repeats: int, warmup: bool = True):
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", type=Path, default=SHARED / "data" / "tinyshakespeare" / "input.txt")
    ap.add_argument("--tokens", type=int, default=512, help="prefill length")
    ap.add_argument("--decode", type=int, default=32, help="greedy tokens to generate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--load-repeats", type=int, default=1, help="loads are slow: best of this many")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import gguf
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from newllm.checkpoints import gguf as ours_gguf
    from newllm.checkpoints.gguf_dequant import dequantize
    from newllm import load_tokenizer

    hf_logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, file {args.gguf.name}")
    rows = []

    def load_ours():
        ours_gguf._reader_cache.clear()  # time the whole parse every time
        return ours_gguf.load_gguf_model(args.gguf).eval()

    def load_hf():
        return AutoModelForCausalLM.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name,
                                                    dtype=torch.float32).eval()

    t_ours, model = best_time(load_ours, args.load_repeats, warmup=False)
    t_hf, ref = best_time(load_hf, args.load_repeats, warmup=False)
    rows.append(("load (s)", t_ours, t_hf, t_hf / t_ours))

    reader = ours_gguf.open_gguf(args.gguf)
    t_ours, _ = best_time(lambda: [dequantize(t.data, t.tensor_type) for t in reader.tensors], args.repeats)
    t_ref, _ = best_time(lambda: [gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors], args.repeats)
    rows.append(("dequant all tensors (s)", t_ours, t_ref, t_ref / t_ours))

    tok = load_tokenizer(args.gguf)
    ids = torch.tensor([tok.encode(args.text.read_text()[: args.tokens * 8])[: args.tokens]])
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"{args.text}: only {ids.shape[1]} tokens, asked for {args.tokens}")
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
        print(f"max |logit diff| over {args.tokens} tokens: {diff:.2e}")
        if diff > 1e-3:
            raise SystemExit("logits differ by more than 1e-3: not timing a wrong model")
        t_ours, _ = best_time(lambda: model(ids), args.repeats)
        t_hf, _ = best_time(lambda: ref(ids), args.repeats)
    T = args.tokens
    rows.append((f"prefill {T} tokens (tok/s)", T / t_ours, T / t_hf, t_hf / t_ours))

    if args.decode:
        prompt, n = ids[:, :64], args.decode
        t_ours, out = best_time(lambda: model.generate(prompt, max_new_tokens=n), args.repeats)
        t_hf, out_hf = best_time(lambda: ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                      attention_mask=torch.ones_like(prompt)), args.repeats)
        same = torch.equal(out, out_hf)
        rows.append((f"decode {n} tokens (tok/s)", n / t_ours, n / t_hf, t_hf / t_ours))
        print(f"greedy continuations identical: {same}")

    print(f"\n{'measure':<28}{'newllm':>12}{'transformers':>14}{'speed-up':>10}")
    for name, a, b, ratio in rows:
        print(f"{name:<28}{a:>12.3f}{b:>14.3f}{ratio:>9.2f}x")


if __name__ == "__main__":
    main()
