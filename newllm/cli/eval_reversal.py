"""`newllm eval reversal`: the Reversal Curse evaluation, optionally after a short fine-tune.

    newllm eval reversal --generate 100 --seed 0 --out facts/          # write a fictitious dataset
    newllm eval reversal --model M --train-file facts/train.jsonl --test-forward facts/test_forward.jsonl \
                         --test-reverse facts/test_reverse.jsonl --finetune-steps 300 --lr 1e-4 --save tuned/

The files may be the paper's own (lukasberglund/reversal_curse, prompt/completion JSONL). With
--generate and --model together, the generated files are the defaults for the three file flags.
"""
from __future__ import annotations

from pathlib import Path


def register_reversal(tasks) -> None:
    p = tasks.add_parser("reversal", help="Reversal Curse: forward vs reverse accuracy, log-prob, sentence PPL",
                         description="Fine-tune (optional) on name-first facts, then compare the held-out "
                                     "forward direction with the reverse direction (Berglund et al. 2023).")
    p.add_argument("--model", help="a .gguf file, a Hugging Face or newllm folder, or a preset name")
    p.add_argument("--tokenizer", help="tokenizer.json or .gguf (default: the model's own)")
    p.add_argument("--train-file", action="append", default=[], metavar="JSONL",
                   help="sentences of the training text (repeatable); fine-tuned on, and scored for forward_ppl")
    p.add_argument("--test-forward", metavar="JSONL", help="name-first prompts, held-out paraphrases")
    p.add_argument("--test-reverse", metavar="JSONL", help="description-first prompts (completion: the name)")
    p.add_argument("--finetune-steps", type=int, default=0, help="AdamW steps on the train files first (default 0)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tune windows per step and eval batch (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="fine-tune window length in tokens (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per completion (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tune and of --generate (default 0)")
    p.add_argument("--save", metavar="DIR", help="save the model (fine-tuned, if asked) and its tokenizer here")
    p.add_argument("--generate", type=int, metavar="N", help="write a dataset of N fictitious facts to --out")
    p.add_argument("--out", metavar="DIR", help="folder for --generate (train/test_forward/test_reverse.jsonl)")
    p.add_argument("--force", action="store_true", help="replace files --generate or --save would overwrite")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_reversal)


def run_reversal(args) -> int:
    import math

    from newllm.data.reversal import ReversalDataset, make_reversal_dataset
    from newllm.errors import NewLLMError
    from newllm.files import check_output_dir

    if not 0 < args.lr < math.inf:
        raise NewLLMError(f"--lr must be a finite number > 0, got {args.lr}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 2),
                             ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise NewLLMError(f"{flag} must be >= {low}, got {value}")
    if args.save:
        check_output_dir(args.save, ["model.safetensors", "newllm.json", "tokenizer.json"], args.force)
    if args.generate is not None:
        if not args.out:
            raise NewLLMError("--generate needs --out DIR")
        check_output_dir(args.out, [f"{n}.jsonl" for n in ReversalDataset.FILES], args.force)
        folder = make_reversal_dataset(args.generate, seed=args.seed).save(args.out)
        if args.model is None:
            print(f"wrote {args.generate} facts to {folder}/(train,test_forward,test_reverse).jsonl")
            return 0
        args.train_file = args.train_file or [str(folder / "train.jsonl")]
        args.test_forward = args.test_forward or str(folder / "test_forward.jsonl")
        args.test_reverse = args.test_reverse or str(folder / "test_reverse.jsonl")
    if args.model is None:
        raise NewLLMError("--model is required (or --generate N --out DIR to write a dataset)")
    for flag, value in (("--test-forward", args.test_forward), ("--test-reverse", args.test_reverse)):
        if not value:
            raise NewLLMError(f"{flag} JSONL is required")
    if args.finetune_steps < 0:
        raise NewLLMError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.finetune_steps and not args.train_file:
        raise NewLLMError("--finetune-steps needs at least one --train-file")
    return _evaluate(args)


def _evaluate(args) -> int:
    from newllm import load_pretrained, load_tokenizer
    from newllm.checkpoints.native import save_model
    from newllm.cli.generate import find_tokenizer
    from newllm.data.reversal import read_jsonl, training_documents
    from newllm.eval.reversal import reversal_eval
    from newllm.train.finetune import finetune_on_texts

    from newllm.errors import NewLLMError
    from newllm.files import atomic_write, dumps_json

    trained = [ex for f in args.train_file for ex in read_jsonl(f)] or None
    if args.finetune_steps and trained is None:
        raise NewLLMError(f"--train-file {', '.join(args.train_file)}: no examples to fine-tune on (empty file)")
    forward, reverse = read_jsonl(args.test_forward), read_jsonl(args.test_reverse)
    for flag, path, examples in (("--test-forward", args.test_forward, forward),
                                 ("--test-reverse", args.test_reverse, reverse)):
        if not examples:
            raise NewLLMError(f"{flag} {path}: no examples (empty file)")
    tok = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
    model = load_pretrained(args.model)
    progress = not args.no_progress
    losses = []
    if args.finetune_steps:
        losses = finetune_on_texts(model, tok, training_documents(trained), args.finetune_steps, lr=args.lr,
                                   batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                                   progress=progress)
    if args.save:
        save_model(model, args.save, metadata={"finetuned_on": args.train_file, "steps": args.finetune_steps})
        atomic_write(Path(args.save) / "tokenizer.json", tok.save)
    res = reversal_eval(model.eval(), tok, forward, reverse, trained=trained, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, progress=progress)
    if args.json:
        out = {"model": str(args.model), "finetune_steps": args.finetune_steps,
               "finetune_losses": losses, **res.to_dict()}
        print(dumps_json(out))
        return 0
    if losses:
        print(f"fine-tune      {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"{'':14} {'forward':>10} {'reverse':>10}")
    print(f"{'examples':14} {res.n_forward:>10} {res.n_reverse:>10}")
    print(f"{'accuracy':14} {res.forward_accuracy:>10.3f} {res.reverse_accuracy:>10.3f}")
    print(f"{'logprob':14} {res.forward_logprob:>10.3f} {res.reverse_logprob:>10.3f}")
    print(f"{'logprob/token':14} {res.forward_logprob_per_token:>10.3f} {res.reverse_logprob_per_token:>10.3f}")
    src = f"{res.n_trained} trained" if res.n_trained else "held-out"
    print(f"sentence PPL   forward ({src}) {res.forward_ppl:.3f}, backward {res.backward_ppl:.3f}, "
          f"gap {res.gap:+.3f}; held-out forward {res.forward_heldout_ppl:.3f}")
    return 0
