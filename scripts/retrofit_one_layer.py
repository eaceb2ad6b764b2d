"""Retrofit one layer of a pretrained Llama-architecture model with a window + memory mixer and train
it by attention transfer (issue 11, first measurement): layer L's attention becomes
WindowMemoryLayer (its own softmax attention over the last W tokens, a Hedgehog linear-attention
memory of everything older; Q/K/V/O, MLP and norms copied), the feature maps and window factors are
trained to match the original mixer's output on the teacher's own inputs, and the model is scored
by sliding-window perplexity against the original and against the layer restricted to the window
(the memory switched off: no memory, same weights).

    python3 scripts/retrofit_one_layer.py --layer 15 --window 64 --json runs/retrofit_L15.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from newllm import load_pretrained
from newllm.checkpoints import load_tokenizer
from newllm.data.corpora import find_data_dir, load_tokens, scored_text, separator_id
from newllm.eval.perplexity import sliding_window_perplexity
from newllm.retrofit import memory_from_attention
from newllm.retrofit.transfer import attention_transfer, capture_mixer_io


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--feature-map", default="hedgehog", choices=["hedgehog", "elu"])
    p.add_argument("--train-windows", type=int, default=8, help="teacher windows of --seq training tokens")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--limit-tokens", type=int, default=4000, help="WikiText-2 valid tokens scored")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    data_dir = find_data_dir(args.data_dir)
    model_path = Path(args.model or data_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = load_tokenizer(model_path)
    teacher = load_pretrained(model_path).eval()
    t0 = time.perf_counter()
    train = load_tokens("wikitext-2", "train", tok, data_dir=data_dir)
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(train) - args.seq, args.train_windows)
    windows = [torch.from_numpy(train[s:s + args.seq].astype("int64"))[None] for s in starts]
    pairs = capture_mixer_io(teacher, args.layer, windows, progress=True)
    t_capture = time.perf_counter() - t0
    student = memory_from_attention(teacher, [args.layer], kind="window_memory", window=args.window,
                                    feature_map=args.feature_map)
    t0 = time.perf_counter()
    losses = attention_transfer(student.layers[args.layer], pairs, steps=args.steps, lr=args.lr, progress=True)
    t_train = time.perf_counter() - t0
    valid = load_tokens("wikitext-2", "valid", tok, data_dir=data_dir)[:args.limit_tokens]
    ids, text = torch.from_numpy(valid.astype("int64")), scored_text(valid, tok, separator_id(tok))

    def ppl(model):
        r = sliding_window_perplexity(model, ids, context=args.context, stride=args.stride, batch_size=1, text=text)
        return {"token_ppl": r.token_ppl, "word_ppl": r.word_ppl, "bits_per_byte": r.bits_per_byte}

    res = {"model": str(model_path), "layer": args.layer, "window": args.window, "feature_map": args.feature_map,
           "train_tokens": args.train_windows * args.seq, "steps": args.steps, "lr": args.lr,
           "capture_s": t_capture, "train_s": t_train, "loss_first": losses[0], "loss_last": losses[-1],
           "losses": losses, "eval": {"tokens": int(len(valid)), "context": args.context, "stride": args.stride}}
    res["baseline"] = ppl(teacher)
    res["retrofit"] = ppl(student)
    student.layers[args.layer].memory_enabled = False
    res["window_only"] = ppl(student)  # the same layer restricted to the window, no memory
    student.layers[args.layer].memory_enabled = True
    res["window_factor"] = student.layers[args.layer].gates()["window"].tolist()
    for k in ("retrofit", "window_only"):
        res[k]["ratio"] = res[k]["token_ppl"] / res["baseline"]["token_ppl"]
    print(json.dumps({k: v for k, v in res.items() if k != "losses"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
