"""`newllm eval passkey`: passkey retrieval accuracy by prompt length and needle depth.

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
