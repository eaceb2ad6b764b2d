"""Retrofit layers of a pretrained Llama-architecture model with a window + memory mixer and train
it by attention transfer (issue 11, first measurement): layer L's attention becomes
WindowMemoryLayer (its own softmax attention over the last W tokens, a Hedgehog linear-attention
memory of everything older; Q/K/V/O, MLP and norms copied), the feature maps and window factors are
trained to match the original mixer's output on the teacher's own inputs, and the model is scored
by sliding-window perplexity against the original, against the layer restricted to the window
(the memory switched off: no memory, same weights) and against the window plus attention sinks.

    python3 scripts/retrofit_one_layer.py --layers 15 --window 64 --json runs/retrofit_L15.json
    python3 scripts/retrofit_one_layer.py --layers every-other --window 64     # 15 of SmolLM2's 30 layers
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from newllm import NewLLMError, load_pretrained
from newllm.files import check_output, write_json
from newllm.checkpoints import load_tokenizer
from newllm.data.corpora import find_data_dir, load_tokens, scored_text, separator_id
from newllm.eval.perplexity import sliding_window_perplexity
from newllm.retrofit import memory_from_attention, with_layer_options
from newllm.retrofit.transfer import attention_transfer, capture_mixer_io


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--layers", default="15", help="comma-separated layer indices, or 'every-other' (1, 3, ...)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--feature-map", default="hedgehog", choices=["hedgehog", "elu"])
    p.add_argument("--train-windows", type=int, default=8, help="teacher windows of --seq training tokens")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--limit-tokens", type=int, default=4000, help="WikiText-2 valid tokens scored")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--sinks", type=int, default=4, help="attention sinks of the window+sinks baseline")
    p.add_argument("--memory-sinks", type=int, default=0, help="attention sinks inside the retrofitted layers too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here (refused if the file exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    out = check_output(args.json, args.force) if args.json else None  # checked before any work
    torch.manual_seed(args.seed)
    data_dir = find_data_dir(args.data_dir)
    model_path = Path(args.model or data_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = load_tokenizer(model_path)
    teacher = load_pretrained(model_path).eval()
    n = len(teacher.layers)
    try:
        layers = list(range(1, n, 2)) if args.layers == "every-other" else [int(i) for i in args.layers.split(",")]
    except ValueError:
        raise NewLLMError(f"--layers must be comma-separated layer indices or 'every-other', got {args.layers!r}") \
            from None
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers or args.steps < 1 or args.train_windows < 1:
        raise NewLLMError(f"need layers in 0..{n - 1} (got {layers}), --steps >= 1 and --train-windows >= 1")
    t0 = time.perf_counter()
    train = load_tokens("wikitext-2", "train", tok, data_dir=data_dir)
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(train) - args.seq, args.train_windows)
    windows = [torch.from_numpy(train[s:s + args.seq].astype("int64"))[None] for s in starts]
    pairs = capture_mixer_io(teacher, layers, windows, progress=True)
    t_capture = time.perf_counter() - t0
    student = memory_from_attention(teacher, layers, kind="window_memory", window=args.window,
                                    feature_map=args.feature_map, attention_sinks=args.memory_sinks)
    t0 = time.perf_counter()
    losses = {i: attention_transfer(student.layers[i], pairs.pop(i), steps=args.steps, lr=args.lr, progress=True)
              for i in layers}  # each layer alone, on the teacher's own inputs to it
    t_train = time.perf_counter() - t0
    valid = load_tokens("wikitext-2", "valid", tok, data_dir=data_dir)[:args.limit_tokens]
    ids, text = torch.from_numpy(valid.astype("int64")), scored_text(valid, tok, separator_id(tok))

    def ppl(model):
        r = sliding_window_perplexity(model, ids, context=args.context, stride=args.stride, batch_size=1, text=text)
        return {"token_ppl": r.token_ppl, "word_ppl": r.word_ppl, "bits_per_byte": r.bits_per_byte}

    res = {"model": str(model_path), "layers": layers, "window": args.window, "memory_sinks": args.memory_sinks,
           "feature_map": args.feature_map,
           "train_tokens": args.train_windows * args.seq, "steps": args.steps, "lr": args.lr,
           "capture_s": t_capture, "train_s": t_train, "loss_first": {i: v[0] for i, v in losses.items()},
           "loss_last": {i: v[-1] for i, v in losses.items()},
           "losses": losses, "eval": {"tokens": int(len(valid)), "context": args.context, "stride": args.stride}}
    res["baseline"] = ppl(teacher)
    res["retrofit"] = ppl(student)
    for i in layers:
        student.layers[i].memory_enabled = False
    res["window_only"] = ppl(student)  # the same layers restricted to the window (+ memory sinks), no memory
    for i in layers:
        student.layers[i].memory_enabled = True
    sinks = with_layer_options(teacher, {i: {"sliding_window": args.window, "attention_sinks": args.sinks}
                                         for i in layers})
    res["window_sinks"] = {**ppl(sinks), "sinks": args.sinks}  # StreamingLLM: the window plus the first tokens
    res["window_factor"] = {i: student.layers[i].gates()["window"].tolist() for i in layers}
    res["state_bytes"] = {}  # measured: the held state after T tokens, original vs retrofitted
    for T in (2048, 8192):
        ids_T = torch.from_numpy(train[:T].astype("int64"))[None]
        for name, m in (("original", teacher), ("retrofit", student)):
            with torch.no_grad():
                m.reset_memory()
                for a in range(0, T, 1024):
                    m(ids_T[:, a:a + 1024], update_memory=True, logits_to_keep=1)
            res["state_bytes"].setdefault(name, {})[T] = sum(m.memory_size_bytes())
            m.reset_memory()
    for k in ("retrofit", "window_only", "window_sinks"):
        res[k]["ratio"] = res[k]["token_ppl"] / res["baseline"]["token_ppl"]
    print(json.dumps({k: v for k, v in res.items() if k != "losses"}, indent=2))
    if out is not None:
        write_json(out, res)  # atomic: a killed run leaves the old file or the new one
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except NewLLMError as e:  # bad input: one line naming the problem, no traceback
        raise SystemExit(f"{Path(__file__).name}: error: {e}") from None
