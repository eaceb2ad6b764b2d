"""`newllm generate MODEL "prompt"`: greedy or sampled continuation."""
from __future__ import annotations

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
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
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
    raise NewLLMError(f"{model_path}: no tokenizer.json in the model folder; pass --tokenizer")


def run(args) -> int:
    import torch

    from newllm import load_pretrained, load_tokenizer

    model = load_pretrained(args.model).eval()
    tok = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
    ids = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=model.config.eos_token_id, generator=gen)
    print(args.prompt + tok.decode(out[0, ids.shape[1]:].tolist()))
    return 0
