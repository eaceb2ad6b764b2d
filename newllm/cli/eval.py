"""`newllm eval TASK ...`: evaluations, one sub-subcommand each: `ppl` (this module), `reversal`
(eval_reversal.py), `passkey` (eval_passkey.py), `recall` and `position` (eval_memory.py), `harness`
(eval_harness.py: lm-evaluation-harness).

A new task is a function ``register_<task>(tasks)`` that adds a parser to `tasks` with
``set_defaults(func=...)``, listed in `TASKS`.
"""
from __future__ import annotations

import math
import sys
import time

from newllm.cli.eval_harness import register_harness
from newllm.cli.eval_memory import register_position, register_recall
from newllm.cli.eval_passkey import register_passkey
from newllm.cli.eval_reversal import register_reversal


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (ppl: sliding-window perplexity; reversal: the Reversal Curse; "
                                    "passkey: passkey retrieval; recall, position: what a memory carries "
                                    "past the receptive field; harness: lm-evaluation-harness)")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for reg in TASKS:
        reg(tasks)


# ------------------------------------------------------------------------------------ ppl
def register_ppl(tasks) -> None:
    p = tasks.add_parser("ppl", help="sliding-window perplexity on a corpus split",
                         description="Token perplexity, word perplexity and bits per byte, scoring only the "
                                     "tokens new to each window (the Hugging Face perplexity-guide method).")
    p.add_argument("--model", required=True, help="a .gguf file, a Hugging Face or newllm folder, or a preset name")
    p.add_argument("--data", default="wikitext-2",
                   help="wikitext-2, tinyshakespeare, gutenberg, a .txt file or folder, or hf:<dataset>/<config>")
    p.add_argument("--split", default="test", help="train, valid, test or all (default: test)")
    p.add_argument("--context", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--stride", type=int, default=512, help="tokens between window starts (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--tokenizer", help="tokenizer.json or .gguf (default: the model's own)")
    p.add_argument("--data-dir", help="data directory (default: $NEWLLM_DATA_DIR, else ../shared)")
    p.add_argument("--cache-dir", help="token cache (default: $NEWLLM_CACHE_DIR, else ~/.cache/newllm)")
    p.add_argument("--limit-tokens", type=int, help="evaluate only the first N tokens of the split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_ppl)


def run_ppl(args) -> int:
    import torch

    from newllm import load_pretrained, load_tokenizer
    from newllm.cli.generate import find_tokenizer
    from newllm.data.corpora import load_tokens, scored_text, separator_id
    from newllm.errors import NewLLMError
    from newllm.eval.perplexity import sliding_window_perplexity
    from newllm.files import dumps_json

    if args.limit_tokens is not None and args.limit_tokens < 2:
        raise NewLLMError(f"--limit-tokens must be >= 2, got {args.limit_tokens}")
    tok = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
    tokens = load_tokens(args.data, args.split, tok, data_dir=args.data_dir, cache_dir=args.cache_dir)
    if args.limit_tokens is not None:
        tokens = tokens[:args.limit_tokens]
    model = load_pretrained(args.model).eval()
    text = scored_text(tokens, tok, separator_id(tok))
    start = time.perf_counter()
    res = sliding_window_perplexity(model, torch.from_numpy(tokens.astype("int64")), context=args.context,
                                    stride=args.stride, batch_size=args.batch_size, text=text,
                                    progress=not args.no_progress)
    seconds = time.perf_counter() - start
    out = {"model": str(args.model), "data": str(args.data), "split": args.split, "context": args.context,
           "stride": args.stride, "tokens_in_text": int(len(tokens)), **res.to_dict(), "seconds": round(seconds, 2)}
    finite = math.isfinite(res.nll_sum)
    if not finite:
        out["error"] = NONFINITE
    if args.json:
        print(dumps_json(out))  # valid JSON: null for each non-finite value, named under "nonfinite"
        return 0 if finite else 1
    print(f"model          {args.model}")
    print(f"data           {args.data} / {args.split}: {len(tokens):,} tokens, {res.n_words:,} words, "
          f"{res.n_bytes:,} bytes")
    print(f"windows        {res.n_windows:,} (context {args.context}, stride {args.stride})")
    print(f"tokens scored  {res.n_tokens:,}")
    print(f"token PPL      {res.token_ppl:.4f}")
    print(f"word PPL       {res.word_ppl:.4f}")
    print(f"bits per byte  {res.bits_per_byte:.4f}")
    print(f"time           {seconds:.1f} s ({res.n_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    if not finite:
        print(f"newllm: error: {NONFINITE}", file=sys.stderr)
        return 1
    return 0


#: what `eval ppl` says (stderr, exit status 1; JSON "error") when the perplexity is not finite
NONFINITE = ("the perplexity is not finite: some scored token had a NaN or infinite loss (the model has "
             "NaN/Inf weights, or its activations overflowed)")


TASKS = [register_ppl, register_reversal, register_passkey, register_recall, register_position, register_harness]
