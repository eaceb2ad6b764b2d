"""`newllm eval passkey`: passkey retrieval accuracy by prompt length and needle depth, or by distance.

`--distances D ...` is the memory test instead: the needle ends exactly D tokens before the answer
(`newllm.eval.passkey.passkey_distance_eval`); beyond the model's receptive field (printed) only a
memory can answer, and a model with a memory is scored again with it switched off (same weights).
`--finetune-steps` then fine-tunes at `--finetune-distances` (default: the smallest distance).

Prints the accuracy table (one row per length, one column per depth) and the overall accuracy, or
with --json the whole `PasskeyResult` (every prompt's generated text included). Prompts longer than
the model's `max_position_embeddings` are run, not refused (RoPE has no hard limit), with a note
when the model has layers that use positions (`BaseLayer.uses_positions`).
"""
from __future__ import annotations

import time

def register_passkey(tasks) -> None:
    p = tasks.add_parser("passkey", help="passkey retrieval accuracy by prompt length and needle depth",
                         description="Hide 'The pass key is N' at a depth of a filler text and ask for it back "
                                     "(Landmark attention / Infini-attention format); greedy decoding.")
    p.add_argument("--model", required=True, help="a .gguf file, a Hugging Face or newllm folder, or a preset name")
    p.add_argument("--tokenizer", help="tokenizer.json or .gguf (default: the model's own)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths, fractions 0..1 of the filler")
    p.add_argument("--n-per-cell", type=int, default=5, help="prompts per (length, depth) (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation prompts (default 0)")
    p.add_argument("--digits", type=int, default=5, help="digits of the passkey (default 5)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts of equal length per generate call")
    p.add_argument("--finetune-steps", type=int, default=0, help="passkey fine-tuning steps first (default 0)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--finetune-batch-size", type=int, default=4, help="fine-tuning prompts per step (default 4)")
    p.add_argument("--distances", type=int, nargs="+",
                   help="instead of lengths x depths: needle end -> answer distances in tokens (the memory test)")
    p.add_argument("--finetune-distances", type=int, nargs="+", help="with --distances: fine-tuning distances "
                   "(default: the smallest of --distances)")
    p.add_argument("--lead", type=int, default=0, help="with --distances: filler tokens before the needle (default 0)")
    p.add_argument("--plot", help="save a heat map (PNG) of the accuracy table here")
    p.add_argument("--force", action="store_true", help="replace an existing --plot file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_passkey)


def position_note(model, max_length: int) -> str | None:
    """A note when prompts exceed max_position_embeddings on a model with layers that use positions."""
    max_pos = model.config.max_position_embeddings
    types = sorted({layer.layer_type for layer in model.layers if layer.uses_positions})
    if max_pos is None or max_length <= max_pos or not types:
        return None
    return (f"prompts up to {max_length} tokens exceed max_position_embeddings={max_pos}: the {'/'.join(types)} "
            f"layers run past the positions the model was built for (RoPE has no hard limit)")


def run_passkey(args) -> int:
    from newllm import load_pretrained, load_tokenizer
    from newllm.cli.generate import find_tokenizer
    from newllm.errors import NewLLMError
    from newllm.eval.passkey import passkey_eval, plot_passkey_heatmap
    from newllm.train.finetune import passkey_finetune

    from newllm.files import check_output, dumps_json

    if args.finetune_steps < 0:
        raise NewLLMError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.plot:
        check_output(args.plot, args.force)
    tok = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
    model = load_pretrained(args.model)
    if args.distances:
        return run_distances(args, model, tok)
    note = position_note(model, max(args.lengths))
    losses = []
    if args.finetune_steps:
        losses = passkey_finetune(model, tok, args.finetune_steps, args.lengths, lr=args.lr,
                                  batch_size=args.finetune_batch_size, seed=args.seed, digits=args.digits,
                                  progress=not args.no_progress)
    start = time.perf_counter()
    res = passkey_eval(model.eval(), tok, args.lengths, args.depths, n_per_cell=args.n_per_cell, seed=args.seed,
                       digits=args.digits, batch_size=args.batch_size, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    if args.plot:
        plot_passkey_heatmap(res, args.plot, title=f"passkey: {args.model}")
    if args.json:
        out = {"model": str(args.model), **res.to_dict(), "finetune_steps": args.finetune_steps,
               "finetune_losses": losses, "note": note, "seconds": round(seconds, 2)}
        print(dumps_json(out))
        return 0
    print(f"model    {args.model}")
    if losses:
        print(f"finetune {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if note:
        print(f"note     {note}")
    print(f"accuracy ({args.n_per_cell} prompts per cell, {args.digits}-digit keys)")
    print("length \\ depth " + "".join(f"{d:>8g}" for d in res.depths))
    for L, row in zip(res.lengths, res.accuracy):
        print(f"{L:>14} " + "".join(f"{a:>8.2f}" for a in row))
    print(f"overall  {res.overall:.4f}")
    print(f"time     {seconds:.1f} s")
    return 0


def run_distances(args, model, tok) -> int:
    """`--distances`: accuracy by needle distance, with the memory and without."""
    from newllm.errors import NewLLMError
    from newllm.eval.passkey import passkey_distance_eval
    from newllm.files import dumps_json
    from newllm.train.finetune import passkey_distance_finetune

    if args.plot:
        raise NewLLMError("--plot draws the lengths x depths table; it does not go with --distances")
    losses = []
    if args.finetune_steps:
        losses = passkey_distance_finetune(model, tok, args.finetune_steps,
                                           args.finetune_distances or [min(args.distances)], lr=args.lr,
                                           batch_size=args.finetune_batch_size, seed=args.seed, digits=args.digits,
                                           lead=args.lead, progress=not args.no_progress)
    start = time.perf_counter()
    res = passkey_distance_eval(model.eval(), tok, args.distances, n_per_distance=args.n_per_cell, seed=args.seed,
                                digits=args.digits, lead=args.lead, batch_size=args.batch_size,
                                progress=not args.no_progress)
    seconds = time.perf_counter() - start
    if args.json:
        print(dumps_json({"model": str(args.model), **res, "finetune_steps": args.finetune_steps,
                          "finetune_losses": losses, "seconds": round(seconds, 2)}))
        return 0
    rf = res["receptive_field"]
    print(f"model             {args.model}")
    print(f"receptive field   {'unbounded' if rf is None else f'{rf} tokens'}")
    if losses:
        print(f"finetune          {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    off = res["accuracy_memory_off"]
    print(f"{'distance':>10} {'accuracy':>10}" + (f" {'memory off':>11}" if off else ""))
    for i, d in enumerate(res["distances"]):
        print(f"{d:>10} {res['accuracy'][i]:>10.2f}" + (f" {off[i]:>11.2f}" if off else ""))
    print(f"time              {seconds:.1f} s")
    return 0
