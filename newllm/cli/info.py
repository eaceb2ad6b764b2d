"""`newllm info MODEL`: architecture, parameter count, layer types, dtype."""
from __future__ import annotations

import json

from newllm.files import dumps_json


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a model (file, folder or preset name)")
    p.add_argument("model", help="a .gguf file, a Hugging Face or newllm folder, or a preset name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from newllm.cli.generate import load_with_note

    model = load_with_note(args.model)
    info = model.describe()
    info["source"] = str(args.model)
    info["layer_spec"] = model.config.layers[0]
    if args.json:
        print(dumps_json(info))
        return 0
    print(f"model        {args.model}")
    print(f"parameters   {info['parameters']:,}")
    print(f"layers       {info['layers']}  ({', '.join(f'{n} x {t}' for t, n in info['layer_types'].items())})")
    print(f"hidden size  {info['hidden_size']}")
    print(f"vocab size   {info['vocab_size']}")
    print(f"dtype        {info['dtype']}")
    print(f"tied head    {info['tie_word_embeddings']}")
    print(f"layer 0      {json.dumps(info['layer_spec'])}")
    return 0
