"""`newllm generate MODEL "prompt"`: greedy or sampled continuation.

Decoding stops at the end of text or the end of a turn (`<|im_end|>`, `<|eot_id|>`, ...: every stop
token the tokenizer knows, and the model's eos id), and special tokens are not printed.
"""
from __future__ import annotations

import sys
from pathlib import Path

from newllm.errors import NewLLMError


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("model", help="a .gguf file, or a Hugging Face or newllm folder")
    p.add_argument("prompt")
    p.add_argument("--tokenizer", help="tokenizer.json or .gguf (default: found beside/inside the model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (k >= 1)")
    p.add_argument("--top-p", type=float, help="sample from the smallest set with this much probability, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def find_tokenizer(model_path: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    p = Path(model_path)
    if p.suffix == ".gguf":
        return str(p)
    if (p / "tokenizer.json").exists():
        return str(p / "tokenizer.json")
    if not p.exists():  # a preset name, or a path that is not there
        raise NewLLMError(f"{model_path}: no such model file or folder (a preset name needs a tokenizer); "
                          "pass --tokenizer, or check the path")
    raise NewLLMError(f"{model_path}: no tokenizer.json in the model folder; pass --tokenizer")


def load_with_note(path, **kwargs):
    """`load_pretrained(path)`, saying so on a terminal first (a real model takes seconds to load)."""
    from newllm import load_pretrained

    if sys.stderr.isatty():
        print(f"loading {path} ...", file=sys.stderr, flush=True)
    return load_pretrained(path, **kwargs)


def check_prompt(prompt: str) -> str:
    """The prompt as UTF-8 text: a command line that is not UTF-8 (read with surrogate escapes) or
    an empty prompt is a one-line error."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NewLLMError(f"prompt: not valid UTF-8 (byte {e.start} of the command-line argument)") from None
    if not prompt:
        raise NewLLMError("prompt: empty; give some text to continue")
    return prompt


def run(args) -> int:
    import torch

    from newllm import load_tokenizer
    from newllm.models.model import check_sampling

    prompt = check_prompt(args.prompt)
    check_sampling(args.max_new_tokens, args.sample, args.temperature, args.top_k, args.top_p)
    tok = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
    ids = tok.encode(prompt)
    if not ids:
        raise NewLLMError(f"prompt {prompt!r}: the tokenizer gives no tokens for it")
    model = load_with_note(args.model).eval()
    ids = torch.tensor([ids], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    stops = tok.stop_token_ids(model.config.eos_token_id)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=stops or None, generator=gen)
    print(prompt + tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    return 0
