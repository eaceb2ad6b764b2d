"""`newllm eval harness`: lm-evaluation-harness on a newllm model, offline, beside newllm's own evaluator.

    newllm eval harness --model M --tasks wikitext [--limit-docs N] [--max-length L] [--backend both]

The model goes to lm-eval as a Hugging Face model (`newllm.hf.to_hf`) through
`lm_eval.models.huggingface.HFLM(pretrained=<that model>, tokenizer=<its tokenizer>)`. `wikitext` is
lm-eval's own wikitext task over the local WikiText-2 split (newllm/eval/harness.py); other task names
are lm-eval's, run offline. `--backend newllm` scores wikitext with `newllm.eval.rolling` (lm-eval's
protocol, no lm_eval import); `--backend both` runs the two on the same pages and prints the relative
difference of each metric.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from newllm.errors import NewLLMError

BACKENDS = ("lm-eval", "newllm", "both")


def register_harness(tasks) -> None:
    p = tasks.add_parser("harness", help="lm-evaluation-harness tasks (offline wikitext on the local file), "
                                         "and newllm's evaluator in lm-eval's protocol",
                         description="lm-eval's HFLM on the model as a transformers model; wikitext is lm-eval's "
                                     "own task on the local WikiText-2 split (nothing is downloaded).")
    p.add_argument("--model", required=True,
                   help="a .gguf file, a Hugging Face, newllm or newllm-HF (save_pretrained) folder, or a preset name")
    p.add_argument("--tasks", required=True, help="comma-separated: wikitext, or other lm-eval task names whose data "
                                                  "is local (the HF cache, --include-path)")
    p.add_argument("--tokenizer", help="tokenizer.json or .gguf (default: the model's own)")
    p.add_argument("--split", default="test", help="WikiText-2 split for wikitext: train, valid or test (default test)")
    p.add_argument("--limit-docs", type=int, help="only the first N documents (wikitext pages; other tasks: examples)")
    p.add_argument("--max-length", type=int,
                   help="tokens per window (default: lm-eval's, the model's max_position_embeddings or 2048)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--prefix-token-id", type=int, help="token before each document (default: lm-eval's: BOS, else EOS)")
    p.add_argument("--backend", choices=BACKENDS, default="lm-eval",
                   help="lm-eval (default), newllm (newllm.eval.rolling, wikitext only) or both, side by side")
    p.add_argument("--include-path", help="a folder of lm-eval task YAMLs (local-file tasks)")
    p.add_argument("--data-dir", help="data directory (default: $NEWLLM_DATA_DIR, else ../shared)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (newllm backend)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_harness_cli)


def load_hf(model_path: str, tokenizer: str | None):
    """(HF model, newllm tokenizer) for `--model`: a newllm-HF folder (config.json with model_type
    "newllm") loads with from_pretrained, anything else with newllm.load_pretrained and `to_hf`."""
    from newllm import load_pretrained, load_tokenizer
    from newllm.cli.generate import find_tokenizer
    from newllm.hf import NewLLMForCausalLM, to_hf

    tok = load_tokenizer(find_tokenizer(model_path, tokenizer))
    cfg = Path(model_path) / "config.json"
    if cfg.is_file():
        try:
            model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError):
            model_type = None  # load_pretrained names what is wrong with the file
        if model_type == "newllm":
            return NewLLMForCausalLM.from_pretrained(model_path).eval(), tok
    return to_hf(load_pretrained(model_path).eval()).eval(), tok


def _check_args(args) -> list[str]:
    for key in ("limit_docs", "max_length", "batch_size", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise NewLLMError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise NewLLMError("--tasks: give at least one task name")
    if args.backend != "lm-eval" and names != ["wikitext"]:
        raise NewLLMError(f"--backend {args.backend}: newllm's evaluator runs lm-eval's protocol for wikitext only, "
                          f"got tasks {names}")
    return names


def run_harness_cli(args) -> int:
    import torch

    from newllm.eval.harness import METRICS, default_max_length, prefix_token_id, run_harness, wikitext_pages, \
        wikitext_task
    from newllm.eval.rolling import rolling_perplexity, wikitext_detokenize
    from newllm.files import dumps_json
    from newllm.hf import hf_tokenizer

    names = _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf, tok = load_hf(args.model, args.tokenizer)
    ht = hf_tokenizer(tok)
    max_length = args.max_length or default_max_length(hf.model.config)
    prefix = prefix_token_id(ht) if args.prefix_token_id is None else args.prefix_token_id
    if not 0 <= prefix < hf.model.config.vocab_size:
        raise NewLLMError(f"--prefix-token-id {prefix} is outside the model's vocabulary [0, {hf.model.config.vocab_size})")
    pages = wikitext_pages(args.split, args.limit_docs, args.data_dir) if "wikitext" in names else None
    out = {"model": str(args.model), "tasks": names, "max_length": max_length, "prefix_token_id": prefix,
           "batch_size": args.batch_size, "documents": None if pages is None else len(pages), "results": {}}
    if args.backend in ("lm-eval", "both"):
        tasks = [wikitext_task(pages) if n == "wikitext" else n for n in names]
        other_limit = args.limit_docs if names != ["wikitext"] else None  # wikitext pages are already cut
        start = time.perf_counter()
        res = run_harness(hf, ht, tasks, max_length=max_length, prefix=prefix, batch_size=args.batch_size,
                          limit=other_limit, include_path=args.include_path)
        out["results"]["lm-eval"] = {t: {k.split(",")[0]: v for k, v in r.items() if "stderr" not in k
                                         and k not in ("name", "alias")} for t, r in res.items()}
        out["seconds_lm_eval"] = round(time.perf_counter() - start, 1)
    if args.backend in ("newllm", "both"):
        docs = [(tok.backend.encode(wikitext_detokenize(p), add_special_tokens=False).ids, p) for p in pages]
        start = time.perf_counter()
        r = rolling_perplexity(hf.model, docs, max_length, prefix, batch_size=args.batch_size,
                               progress=not args.no_progress)
        out["results"]["newllm"] = {"wikitext": {**{m: getattr(r, m) for m in METRICS}, "sample_len": r.n_documents,
                                                 "tokens": r.n_tokens, "windows": r.n_windows, "words": r.n_words,
                                                 "bytes": r.n_bytes, "token_perplexity": r.token_perplexity}}
        out["seconds_newllm"] = round(time.perf_counter() - start, 1)
    if args.backend == "both":
        a, b = out["results"]["lm-eval"]["wikitext"], out["results"]["newllm"]["wikitext"]
        out["relative_difference"] = {m: abs(a[m] - b[m]) / abs(a[m]) for m in METRICS}
    if args.json:
        print(dumps_json(out))
        return 0
    print(f"model        {args.model}")
    print(f"windows of   {max_length} tokens, prefix token {prefix}"
          + ("" if pages is None else f", {len(pages)} WikiText-2 {args.split} pages"))
    for backend, results in out["results"].items():
        for task, r in results.items():
            shown = "  ".join(f"{k} {v:.6g}" for k, v in r.items() if isinstance(v, float))
            print(f"{backend:<8} {task:<10} {shown}  ({out['seconds_' + backend.replace('-', '_')]} s)")
    if "relative_difference" in out:
        print("relative difference  " + "  ".join(f"{m} {v:.2e}" for m, v in out["relative_difference"].items()))
    sys.stdout.flush()
    return 0
