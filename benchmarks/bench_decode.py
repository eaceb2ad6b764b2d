"""Greedy decoding at a given position: newllm vs transformers, same weights, same process.

    python benchmarks/bench_decode.py                              # small Llama, positions 256 and 4096
    python benchmarks/bench_decode.py --model smollm2 --threads 1  # SmolLM2-135M (Q4_1 GGUF -> fp32)
    python benchmarks/bench_decode.py --positions 256 1024 4096 --tokens 64 --repeats 3

For each position P the prompt (real text: tiny-shakespeare) is run once (untimed) and then
--tokens tokens are decoded one at a time, greedily, each reusing the previous step's cache:
newllm `model(next, state=state)`, transformers `model(next, past_key_values=cache)`. Printed:
tokens/s of each and the ratio newllm / transformers (> 1: newllm faster), and how each side's
per-token time grows from the first position to the last (attention's own work grows linearly
with the position; a copy of the cache per token grows it further). The greedy tokens of the two
are compared first, so a fast wrong model cannot report a ratio.

Models: "llama" is a Llama of d 256, 4 layers, 8 heads / 2 KV heads (GQA), built in transformers
with random weights and loaded into newllm from its folder; "smollm2" is SmolLM2-135M from its GGUF,
loaded by each library's own GGUF path.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NEWLLM_DATA_DIR", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))


def small_llama(max_pos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from newllm.checkpoints.hf import load_hf_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50304, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_pos,
                      tie_word_embeddings=True)
    ref = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load_hf_model(tmp, dtype=torch.float32).eval()
    return ours, ref


def smollm2(path: Path):
    from transformers import AutoModelForCausalLM

    from newllm.checkpoints.gguf import load_gguf_model

    ours = load_gguf_model(path).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return ours, ref


@torch.no_grad()
def decode_ours(model, prompt, n):
    res = model(prompt, logits_to_keep=1)
    state, nxt, out, times = res.state, res.logits[:, -1].argmax(-1, keepdim=True), [], []
    for _ in range(n):
        t0 = time.perf_counter()
        res = model(nxt, state=state)
        state, nxt = res.state, res.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
        out.append(nxt)
    return torch.cat(out, 1), times


@torch.no_grad()
def decode_hf(model, prompt, n):
    res = model(prompt, use_cache=True, logits_to_keep=1)
    cache, nxt, out, times = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True), [], []
    for _ in range(n):
        t0 = time.perf_counter()
        res = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
        out.append(nxt)
    return torch.cat(out, 1), times


@torch.no_grad()
def linear_floor(model, repeats: int) -> float:
    """Seconds for every nn.Linear of `model` applied once to a single token's input (the decode step's
    matmuls, which read each weight once), the best of `repeats` rounds of 20."""
    mats = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, 1, m.in_features) for m in mats]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(20):
            for m, x in zip(mats, xs):
                m(x)
        best = min(best, (time.perf_counter() - t0) / 20)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama", "smollm2"], default="llama")
    ap.add_argument("--gguf", type=Path, default=SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", type=Path, default=SHARED / "data" / "tinyshakespeare" / "input.txt")
    ap.add_argument("--positions", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded at each position")
    ap.add_argument("--repeats", type=int, default=5, help="best of this many decodes per position (alternating)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from newllm import load_tokenizer

    hf_logging.disable_progress_bar()
    need = max(args.positions) + args.tokens + 1
    if args.model == "llama":
        ours, ref = small_llama(need)
        tok = load_tokenizer(SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
    else:
        ours, ref = smollm2(args.gguf)
        tok = load_tokenizer(args.gguf)
    text = args.text.read_text()
    ids = torch.tensor([tok.encode(text[: need * 8])[:need]])
    if ids.shape[1] < need:
        raise SystemExit(f"{args.text}: {ids.shape[1]} tokens, fewer than the {need} needed")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), model {args.model}, "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters")
    print(f"\n{'position':>9}{'newllm tok/s':>14}{'transformers':>14}{'speed-up':>10}{'growth ours':>13}{'growth hf':>11}")
    base = {}
    for P in args.positions:
        prompt = ids[:, :P]
        runs = {"ours": [], "hf": []}
        for _ in range(args.repeats):  # alternating rounds: both sides see the same background load
            for name, fn, model in (("ours", decode_ours, ours), ("hf", decode_hf, ref)):
                runs[name].append(fn(model, prompt, args.tokens))
        best = {name: (r[0][0], min(sum(t) for _, t in r) / args.tokens) for name, r in runs.items()}
        if not torch.equal(best["ours"][0], best["hf"][0]):
            raise SystemExit(f"position {P}: the greedy tokens differ; not timing a wrong model")
        t_ours, t_hf = best["ours"][1], best["hf"][1]
        base.setdefault("ours", t_ours)
        base.setdefault("hf", t_hf)
        base.setdefault("hf_by_position", {})[P] = t_hf
        print(f"{P:>9}{1 / t_ours:>14.1f}{1 / t_hf:>14.1f}{t_hf / t_ours:>9.2f}x"
              f"{t_ours / base['ours']:>12.2f}x{t_hf / base['hf']:>10.2f}x")
    floor = linear_floor(ours, args.repeats)
    print("\nspeed-up = transformers' per-token time / newllm's; growth = per-token time / that at the first position")
    print(f"the linear layers alone (every weight matrix once on one token, LM head included, the same kernel on "
          f"both sides): {floor * 1e3:.2f} ms per token; a step can be no faster, so the speed-up is at most "
          + ", ".join(f"{hf_t / floor:.2f}x at {P}" for P, hf_t in base["hf_by_position"].items()))


if __name__ == "__main__":
    main()
