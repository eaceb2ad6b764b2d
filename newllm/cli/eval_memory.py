"""`newllm eval recall` and `newllm eval position`: what a model's memory carries past its receptive field.

    newllm eval recall --model M --distance 300 [--train-steps 200]      associative recall, pairs >= 300 tokens back
    newllm eval position --model M --data gutenberg --length 2048        loss past the receptive field, long books

Both print the model's receptive field (`TransformerLM.receptive_field`) and, for a model with a
compressive memory, the same numbers with the memory switched off (same weights).
"""
from __future__ import annotations


def _common(p) -> None:
    p.add_argument("--model", required=True, help="a .gguf file, a Hugging Face or newllm folder, or a preset name")
    p.add_argument("--tokenizer", help="tokenizer.json or .gguf (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def register_recall(tasks) -> None:
    p = tasks.add_parser("recall", help="associative recall with the pairs a chosen distance before the queries",
                         description="Key-value pairs, then the keys again at least --distance tokens later; "
                                     "accuracy of the values, with the memory and without.")
    _common(p)
    p.add_argument("--distance", type=int, required=True, help="fewest tokens between a pair and its query")
    p.add_argument("--segment-length", type=int, default=64, help="layout segment (default 64)")
    p.add_argument("--n-pairs", type=int, default=8, help="pairs per sequence (default 8)")
    p.add_argument("--n-keys", type=int, default=16, help="distinct keys (default 16)")
    p.add_argument("--n-values", type=int, default=16, help="distinct values: chance is 1 / this (default 16)")
    p.add_argument("--train-steps", type=int, default=0, help="train on the task first (default 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="training learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches scored (default 4)")
    p.set_defaults(func=run_recall)


def run_recall(args) -> int:
    import numpy as np
    import torch

    from newllm import load_pretrained, load_tokenizer
    from newllm.cli.generate import find_tokenizer
    from newllm.data.recall import make_recall_batch, recall_distance, recall_gap
    from newllm.errors import NewLLMError
    from newllm.eval.ablation import has_memory, memory_switched_off
    from newllm.eval.recall import recall_eval
    from newllm.files import dumps_json
    from newllm.train.finetune import recall_train

    for key in ("distance", "segment_length", "batch_size", "eval_batches"):
        if getattr(args, key) < 1:
            raise NewLLMError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.train_steps < 0:
        raise NewLLMError(f"--train-steps must be >= 0, got {args.train_steps}")
    tok = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
    model = load_pretrained(args.model)
    kw = dict(tokenizer=tok, n_keys=args.n_keys, n_values=args.n_values)
    gap = recall_gap(args.distance, args.n_pairs, args.segment_length)
    losses = []
    if args.train_steps:
        losses = recall_train(model, args.train_steps, n_pairs=args.n_pairs, segment_length=args.segment_length,
                              batch=args.batch_size, lr=args.lr, seed=args.seed + 1, progress=not args.no_progress,
                              n_segments_gap=gap, **kw)
    g = torch.Generator().manual_seed(args.seed)
    batches = [make_recall_batch(args.n_pairs, args.segment_length, args.batch_size, g, n_segments_gap=gap, **kw)
               for _ in range(args.eval_batches)]
    on = float(np.mean([recall_eval(model, *b) for b in batches]))
    off = None
    if has_memory(model):
        with memory_switched_off(model):
            off = float(np.mean([recall_eval(model, *b) for b in batches]))
    out = {"model": str(args.model), "distance": recall_distance(args.n_pairs, args.segment_length, gap),
           "n_segments_gap": gap, "receptive_field": model.receptive_field, "accuracy": on, "accuracy_memory_off": off,
           "chance": 1.0 / args.n_values, "train_steps": args.train_steps, "losses": losses}
    if args.json:
        print(dumps_json(out))
        return 0
    rf = out["receptive_field"]
    print(f"model             {args.model}")
    print(f"receptive field   {'unbounded' if rf is None else f'{rf} tokens'}")
    print(f"pairs             {args.n_pairs}, at least {out['distance']} tokens before their queries")
    print(f"accuracy          {on:.4f}" + ("" if off is None else f"  (memory off {off:.4f})")
          + f"  chance {out['chance']:.4f}")
    return 0


def register_position(tasks) -> None:
    p = tasks.add_parser("position", help="loss past the receptive field on long documents, memory on and off",
                         description="Each long document's first --length tokens from an empty state; mean loss "
                                     "at positions >= --start with a bootstrap interval over documents.")
    _common(p)
    p.add_argument("--data", default="gutenberg", help="corpus (default gutenberg: one document per book)")
    p.add_argument("--split", default="test", help="train, valid, test or all (default test)")
    p.add_argument("--data-dir", help="data directory (default: $NEWLLM_DATA_DIR, else ../shared)")
    p.add_argument("--cache-dir", help="token cache (default: $NEWLLM_CACHE_DIR, else ~/.cache/newllm)")
    p.add_argument("--length", type=int, default=2048, help="tokens read of each document (default 2048)")
    p.add_argument("--docs", type=int, default=32, help="documents at most (default 32)")
    p.add_argument("--start", type=int, help="first scored position (default: the receptive field + 1)")
    p.add_argument("--chunk", type=int, help="tokens per call, the state carried (default: the whole document)")
    p.add_argument("--confidence", type=float, default=0.95, help="bootstrap interval level (default 0.95)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.set_defaults(func=run_position)


def run_position(args) -> int:
    from newllm import load_pretrained, load_tokenizer
    from newllm.cli.generate import find_tokenizer
    from newllm.data.corpora import load_tokens, separator_id
    from newllm.errors import NewLLMError
    from newllm.eval.position import long_documents, loss_beyond
    from newllm.files import dumps_json

    if args.length < 2 or args.docs < 1:
        raise NewLLMError(f"--length must be >= 2 and --docs >= 1, got {args.length}, {args.docs}")
    tok = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
    model = load_pretrained(args.model)
    rf = model.receptive_field
    start = args.start if args.start is not None else (0 if rf is None else rf + 1)
    tokens = load_tokens(args.data, args.split, tok, data_dir=args.data_dir, cache_dir=args.cache_dir)
    docs = long_documents(tokens, separator_id(tok), args.length, args.docs)
    if not docs:
        raise NewLLMError(f"--data {args.data} --split {args.split}: no document has {args.length} tokens; "
                          "lower --length")
    res = loss_beyond(model, docs, start, chunk=args.chunk, confidence=args.confidence, resamples=args.resamples,
                      seed=args.seed)
    out = {"model": str(args.model), "data": str(args.data), "split": args.split, "receptive_field": rf, **res}
    if args.json:
        print(dumps_json(out))
        return 0

    def show(name, e):
        lo, hi = e["ci"]
        ci = "" if lo is None else f"  [{lo:.4f}, {hi:.4f}] ({args.confidence:.0%} bootstrap over documents)"
        print(f"{name:<18}{e['mean']:.4f}{ci}")

    print(f"model             {args.model}")
    print(f"receptive field   {'unbounded' if rf is None else f'{rf} tokens'}")
    print(f"documents         {res['n_docs']} x {res['length']} tokens, positions >= {start} scored")
    show("loss", res["on"])
    if "off" in res:
        show("loss, memory off", res["off"])
        show("memory's gain", res["gain"])
    return 0
