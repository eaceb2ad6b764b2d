"""Sliding-window perplexity: our batched evaluator vs the perplexity-guide loop, same model, same text.

    python benchmarks/bench_perplexity.py                     # Pythia-70m-shaped model, 4096 tokens
    python benchmarks/bench_perplexity.py --tokens 16384 --context 2048 --stride 512 --threads 2
    python benchmarks/bench_perplexity.py --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf

The reference is the Hugging Face perplexity-guide loop: one window at a time,
``model(input_ids, labels=target_ids)`` with the tokens already scored masked to -100, the mean loss
times the number of scored labels (counted after the label shift, which the guide gets one too few
for every window after the first). Ours is `newllm.eval.sliding_window_perplexity`, which batches
windows of equal length and asks the model for the logits of the scored positions only
(``logits_to_keep``). The default model is the `pythia` preset (Pythia-70m's shape: 6 layers,
d 512, vocabulary 50,304) with random weights (the work per token does not depend on the values),
the text the first --tokens tokens of WikiText-2 valid through the GPT-NeoX tokenizer.

Prints both NLL sums (they must agree to 1e-6 relative or the script exits non-zero before timing
anything else), wall and CPU seconds, tokens scored per second and the speed-up guide / ours for each;
plus ours at batch size 1, to separate what batching gives from what `logits_to_keep` gives.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWLLM_DATA_DIR", ROOT.parent / "shared"))


@torch.no_grad()
def guide_loop(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """The perplexity-guide loop on a 1-D id tensor; returns (nll_sum, tokens scored)."""
    n, prev_end, nll_sum, count = ids.numel(), 0, 0.0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = model(input_ids, labels=target_ids).loss  # mean over the labels that are not -100
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * scored
        count += scored
        prev_end = end
        if end == n:
            break
    return nll_sum, count


def timed(fn):
    """(wall seconds, CPU seconds of this process, result). On a shared machine the CPU time is the
    steadier figure for a single-threaded run; both are printed."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - w0, time.process_time() - c0), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia", help="preset name, .gguf file or model folder (default: pythia)")
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
                    help="tokenizer for presets (a file or folder model uses its own)")
    ap.add_argument("--data", default="wikitext-2")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--tokens", type=int, default=4096, help="length of the text prefix evaluated")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from newllm import load_pretrained, load_tokenizer
    from newllm.data.corpora import load_tokens
    from newllm.eval import sliding_window_perplexity, window_plan

    own = Path(args.model)
    tok_path = args.tokenizer if not own.exists() else (own if own.suffix == ".gguf" else own / "tokenizer.json")
    tok = load_tokenizer(tok_path)
    torch.manual_seed(0)
    model = load_pretrained(args.model).eval()
    ids = torch.from_numpy(load_tokens(args.data, args.split, tok)[:args.tokens].astype("int64"))
    n_windows = len(window_plan(ids.numel(), args.context, args.stride))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model {args.model} "
          f"({model.num_parameters() / 1e6:.1f}M parameters, vocab {model.config.vocab_size}); "
          f"{args.data}/{args.split} first {ids.numel()} tokens; context {args.context}, stride {args.stride}, "
          f"{n_windows} windows")

    with torch.no_grad():
        model(ids[None, :min(64, ids.numel())])  # warm-up
    t_ref, (ref_nll, ref_n) = timed(lambda: guide_loop(model, ids, args.context, args.stride))
    t_ours, ours = timed(lambda: sliding_window_perplexity(model, ids, args.context, args.stride,
                                                           batch_size=args.batch_size, progress=False))
    print(f"guide loop     nll_sum {ref_nll:.6f}  tokens {ref_n}  PPL {math.exp(ref_nll / ref_n):.4f}")
    print(f"ours (batch {args.batch_size}) nll_sum {ours.nll_sum:.6f}  tokens {ours.n_tokens}  "
          f"PPL {ours.token_ppl:.4f}")
    rel = abs(ours.nll_sum - ref_nll) / abs(ref_nll)
    print(f"relative NLL difference {rel:.2e}")
    if ours.n_tokens != ref_n or rel > 1e-6:
        print("MISMATCH: not timing a wrong result", file=sys.stderr)
        return 1
    t_one, _ = timed(lambda: sliding_window_perplexity(model, ids, args.context, args.stride, batch_size=1,
                                                         progress=False))
    print(f"\n{'':20}{'wall s':>8}{'tokens/s':>10}{'speed-up':>10}{'CPU s':>9}{'speed-up':>10}")
    runs = (("guide loop", t_ref), (f"ours, batch {args.batch_size}", t_ours), ("ours, batch 1", t_one))
    for name, (wall, cpu) in runs:
        print(f"{name:20}{wall:8.2f}{ref_n / wall:10.0f}{t_ref[0] / wall:9.2f}x{cpu:9.2f}{t_ref[1] / cpu:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
