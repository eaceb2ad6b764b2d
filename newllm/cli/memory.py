"""`newllm memory info|save|check|sizes`: inspect, make, validate and size memory-state files.

    newllm memory save MODEL --text book.txt --out mem.safetensors [--compact] [--force]   absorb a text
    newllm memory info mem.safetensors [--json]                                  what a file holds
    newllm memory check mem.safetensors MODEL                                    does it fit MODEL?

A state fits only the weights that wrote it. MODEL given as a preset name is built from
`torch.manual_seed(--seed)` (default 0), the same weights `create_model(name)` gives after that
seed, so `memory save infini ...` and `memory check mem.safetensors infini` agree.
    newllm memory sizes [--presets infini ...] [--tokens 1024 4096] [--markdown] real sizes per preset
"""
from __future__ import annotations

DEFAULT_SIZE_PRESETS = ["pythia", "infini", "multi_memory", "hierarchical"]


def register(sub) -> None:
    p = sub.add_parser("memory", help="memory states: save one from a text, describe, check, size")
    cmd = p.add_subparsers(dest="memory_command", required=True)

    s = cmd.add_parser("save", help="run a text through MODEL with update_memory=True and save the memory")
    s.add_argument("model", help="a .gguf file, a Hugging Face or newllm folder, or a preset name")
    s.add_argument("--text", required=True, help="a UTF-8 text file to absorb")
    s.add_argument("--out", required=True, help="the .safetensors file to write")
    s.add_argument("--tokenizer", help="tokenizer.json or .gguf (default: found beside/inside the model)")
    s.add_argument("--max-tokens", type=int, help="absorb at most this many tokens")
    s.add_argument("--chunk", type=int, default=512, help="tokens per forward call (any split gives the same state)")
    s.add_argument("--compact", action="store_true", help="keep only the compressive memories (no KV caches)")
    s.add_argument("--seed", type=int, default=0, help="seed of a preset MODEL's weights (default 0)")
    s.add_argument("--force", action="store_true", help="replace an existing --out file")
    s.set_defaults(func=run_save)

    i = cmd.add_parser("info", help="describe a memory-state file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print the JSON header")
    i.set_defaults(func=run_info)

    c = cmd.add_parser("check", help="check that a memory-state file fits a model")
    c.add_argument("file")
    c.add_argument("model", help="a .gguf file, a Hugging Face or newllm folder, or a preset name")
    c.add_argument("--seed", type=int, default=0, help="seed of a preset MODEL's weights (default 0)")
    c.add_argument("--allow-weight-mismatch", action="store_true",
                   help="accept a state taken with other weights of the same config")
    c.set_defaults(func=run_check)

    z = cmd.add_parser("sizes", help="measured memory-state bytes per layer of presets after N tokens")
    z.add_argument("--presets", nargs="+", default=DEFAULT_SIZE_PRESETS)
    z.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096])
    z.add_argument("--markdown", action="store_true", help="print a Markdown table (docs/memory_layers.md)")
    z.set_defaults(func=run_sizes)


def run_save(args) -> int:
    import torch

    from newllm import load_tokenizer, save_memory_state
    from newllm.cli.generate import find_tokenizer
    from newllm.errors import NewLLMError

    from newllm.files import check_output

    if args.chunk <= 0:
        raise NewLLMError(f"--chunk must be > 0, got {args.chunk}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise NewLLMError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    check_output(args.out, args.force)
    text = read_text_file(args.text, "--text")
    tok = load_tokenizer(find_tokenizer(args.model, args.tokenizer))
    model = load_model(args.model, args.seed).eval()
    ids = tok.encode(text)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if not ids:
        raise NewLLMError(f"{args.text}: no tokens to absorb")
    ids = torch.tensor([ids], dtype=torch.long)
    model.reset_memory()
    with torch.no_grad():
        for a in range(0, ids.shape[1], args.chunk):
            model(ids[:, a:a + args.chunk], update_memory=True)
    state = model.get_memory_state(compact=args.compact)
    save_memory_state(state, args.out)
    print(f"{args.out}: {state.tokens_absorbed} tokens absorbed, {sum(state.size_bytes()):,} bytes")
    return 0


def load_model(name: str, seed: int):
    """`load_pretrained(name)`; a preset name is built after `torch.manual_seed(seed)` (module doc)."""
    from pathlib import Path

    import torch

    from newllm.cli.generate import load_with_note

    if not Path(name).exists():
        torch.manual_seed(seed)
    return load_with_note(name)


def read_text_file(path: str, flag: str) -> str:
    from pathlib import Path

    from newllm.errors import NewLLMError

    p = Path(path)
    if not p.is_file():
        raise NewLLMError(f"{flag} {p}: " + ("is a folder, not a text file" if p.is_dir() else "no such file"))
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NewLLMError(f"{flag} {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def run_info(args) -> int:
    from newllm import load_memory_state
    from newllm.files import dumps_json
    from newllm.models.state import format_state

    state = load_memory_state(args.file)
    print(dumps_json(state.header()) if args.json else format_state(state))
    return 0


def run_check(args) -> int:
    from newllm import load_memory_state

    state = load_memory_state(args.file)
    model = load_model(args.model, args.seed)
    model.set_memory_state(state, allow_weight_mismatch=args.allow_weight_mismatch)  # raises naming the mismatch
    print(f"{args.file}: fits {args.model} ({state.tokens_absorbed} tokens absorbed)")
    return 0


def measure_sizes(presets: list[str], tokens: list[int], **overrides) -> list[dict]:
    """Run `max(tokens)` zero-cost tokens through each preset (batch 1, fp32) and measure the state
    bytes from its tensors after each count in `tokens`. Token ids are a fixed pattern: sizes do
    not depend on token values."""
    import torch

    from newllm import create_model

    rows = []
    for name in presets:
        torch.manual_seed(0)
        model = create_model(name, **overrides).eval()
        compressive = [bool(l.has_compressive_memory) for l in model.layers]
        row = {"preset": name, "layers": [l.layer_type for l in model.layers], "at": {}}
        model.reset_memory()
        done = 0
        with torch.no_grad():
            for n in sorted(tokens):
                while done < n:
                    step = min(512, n - done)
                    model(torch.arange(done, done + step)[None] % model.config.vocab_size, update_memory=True)
                    done += step
                sizes = model.memory_size_bytes()
                row["at"][n] = {"total": sum(sizes),
                                "compressive": sum(s for s, c in zip(sizes, compressive) if c),
                                "kv": sum(s for s, c in zip(sizes, compressive) if not c),
                                "compact": sum(model.get_memory_state(compact=True).size_bytes())}
        rows.append(row)
    return rows


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024**2 else f"{n / 1024**2:,.2f} MiB"


def run_sizes(args) -> int:
    rows = measure_sizes(args.presets, args.tokens)
    tokens = sorted(args.tokens)
    if args.markdown:
        head = ["preset", "layers", "compressive memory (fixed)"] + [f"KV caches at {n:,} tokens" for n in tokens] \
            + [f"full state at {n:,}" for n in tokens] + ["compact state"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            at = r["at"]
            layers = " + ".join(f"{r['layers'].count(t)} {t}" for t in dict.fromkeys(r["layers"]))
            cells = [r["preset"], layers, _kib(at[tokens[-1]]["compressive"])] + [_kib(at[n]["kv"]) for n in tokens] \
                + [_kib(at[n]["total"]) for n in tokens] + [_kib(at[tokens[-1]]["compact"])]
            print("| " + " | ".join(cells) + " |")
        return 0
    for r in rows:
        for n in tokens:
            a = r["at"][n]
            print(f"{r['preset']:<13} {n:>7,} tokens  total {a['total']:>13,} B  compressive {a['compressive']:>11,} B  "
                  f"KV {a['kv']:>13,} B  compact {a['compact']:>11,} B")
    return 0
