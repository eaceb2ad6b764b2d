"""The no-memory baselines of a retrofit (issue 11): a pretrained model's layers restricted to a
sliding window, alone or with attention sinks, no training; sliding-window perplexity against the
unchanged model on the same tokens.

    python3 scripts/retrofit_window_baselines.py                 # SmolLM2-135M, 12,000 WikiText-2 valid tokens
    python3 scripts/retrofit_window_baselines.py --limit-tokens 4000 --json out.json
    python3 scripts/retrofit_window_baselines.py --only "every other layer"     # those rows (and the baseline)

A memory layer in layer i is worth something only where it beats layer i restricted to the same
window (docs/retrofit.md).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from newllm import NewLLMError, load_pretrained
from newllm.files import check_output, write_json
from newllm.checkpoints import load_tokenizer
from newllm.data.corpora import find_data_dir, load_tokens, scored_text, separator_id
from newllm.eval.perplexity import sliding_window_perplexity
from newllm.retrofit import with_layer_options


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit-tokens", type=int, default=12000)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--sinks", type=int, default=4, help="the sinks of the window + sinks rows (0: window-only rows only)")
    p.add_argument("--windows", type=lambda v: [int(x) for x in v.split(",")], default=[64, 256],
                   help="comma-separated windows (default 64,256)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--only", action="append", default=[], metavar="LAYERS",
                   help="score only these rows (e.g. 'every other layer'; repeatable); the baseline is always scored")
    p.add_argument("--json", help="write the rows here too (refused if the file exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    out = check_output(args.json, args.force) if args.json else None  # checked before any work
    data_dir = find_data_dir(args.data_dir)
    model_path = Path(args.model or data_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = load_tokenizer(model_path)
    tokens = load_tokens("wikitext-2", "valid", tok, data_dir=data_dir)[:args.limit_tokens]
    ids, text = torch.from_numpy(tokens.astype("int64")), scored_text(tokens, tok, separator_id(tok))
    base = load_pretrained(model_path).to(getattr(torch, args.dtype)).eval()
    n = len(base.layers)
    every_other = list(range(1, n, 2))
    variants = [("baseline", {}, None, 0)]
    for w in args.windows:
        for name, layers in (("layer 0", [0]), (f"layer {n // 2}", [n // 2]), (f"layer {n - 1}", [n - 1]),
                             ("every other layer", every_other), ("all layers", list(range(n)))):
            if w == 256 and name in ("layer 0", f"layer {n - 1}", "all layers"):
                continue  # the table: W=256 only for the middle layer and every other layer
            for sinks in sorted({0, args.sinks}):
                variants.append((name, {i: {"sliding_window": w, "attention_sinks": sinks} for i in layers}, w, sinks))
    names = {v[0] for v in variants}
    unknown = sorted(set(args.only) - names)
    if unknown:
        raise NewLLMError(f"--only {unknown}: no such rows; known: {sorted(names)}")
    if args.only:
        variants = [v for v in variants if v[0] == "baseline" or v[0] in args.only]
    rows, ref = [], None
    for name, options, w, sinks in variants:
        model = with_layer_options(base, options) if options else base
        t0 = time.perf_counter()
        r = sliding_window_perplexity(model, ids, context=args.context, stride=args.stride, batch_size=1, text=text,
                                      progress=False)
        ref = ref or r.token_ppl
        row = {"layers": name, "window": w, "sinks": sinks, "token_ppl": r.token_ppl, "word_ppl": r.word_ppl,
               "bits_per_byte": r.bits_per_byte, "ratio": r.token_ppl / ref, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name:<18} W={w!s:<5} sinks={sinks}  token PPL {r.token_ppl:8.3f}  x{row['ratio']:.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)
    res = {"model": str(model_path), "tokens": int(len(tokens)), "context": args.context, "stride": args.stride,
           "dtype": args.dtype, "rows": rows}
    if out is not None:
        write_json(out, res)  # atomic: a killed run leaves the old file or the new one
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except NewLLMError as e:  # bad input: one line naming the problem, no traceback
        raise SystemExit(f"{Path(__file__).name}: error: {e}") from None
