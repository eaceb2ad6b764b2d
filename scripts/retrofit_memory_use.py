"""Is the retrofitted memory used? Two checks on a `newllm retrofit` run (issue 11):

* loss by position on long real documents (the Gutenberg books' test split, the first --length
  tokens of each, read in one call), for the original model, the retrofitted model, and the
  retrofitted model with its memories switched off (its replaced layers then see only their window
  and sinks: the original restricted to the same window). The gain of the memory is the paired
  per-document difference (memory off - memory on), with a 95% interval over documents, per
  position bin; positions inside the window get none by construction.
* passkey retrieval with the key beyond the window, for the same three models.

    python3 scripts/retrofit_memory_use.py --run runs/retrofit_smollm2 --json runs/retrofit_smollm2/memory_use.json
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from newllm import NewLLMError, load_pretrained, load_tokenizer
from newllm.data.corpora import find_data_dir, load_documents
from newllm.retrofit.config import load_retrofit_config, resolve_model_path
from newllm.files import check_output, write_json
from newllm.retrofit.report import memory_layers


@torch.no_grad()
def doc_losses(model, docs) -> np.ndarray:
    """(n_docs, length - 1) next-token losses, each document in one call from an empty state."""
    out = []
    with model.memory_aside(train=False):
        for d in docs:
            ids = torch.as_tensor(d, dtype=torch.long)[None]
            logits = model(ids).logits
            out.append(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none").double().numpy())
    return np.stack(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished `newllm retrofit` run folder")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--length", type=int, default=2048, help="tokens read from each book")
    p.add_argument("--edges", default="0,64,256,512,1024,2048", help="position bin edges")
    p.add_argument("--passkey-lengths", default="512,2048")
    p.add_argument("--passkey-depths", default="0.1,0.5")
    p.add_argument("--passkey-n", type=int, default=4)
    p.add_argument("--json", help="write the results here (refused if the file exists, unless --force)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    out = check_output(args.json, args.force) if args.json else None  # before any work
    run = Path(args.run)
    cfg = load_retrofit_config(run / "config.yaml")
    stages = sorted((run / "stages").glob("*/model"))
    if not (run / "results.json").is_file() or not stages:
        raise NewLLMError(f"{run}: not a finished retrofit run (no results.json or stage model)")
    data_dir = find_data_dir(args.data_dir or cfg.data_dir)
    model_path = resolve_model_path(cfg.model.path, data_dir)
    tok = load_tokenizer(cfg.model.tokenizer or model_path)
    original = load_pretrained(model_path).eval()
    retrofit = load_pretrained(stages[-1]).eval()
    mem = memory_layers(retrofit)
    edges = [int(e) for e in args.edges.split(",")]
    if edges[-1] > args.length:
        raise NewLLMError(f"--edges end at {edges[-1]}, beyond --length {args.length}")

    docs = []
    for text in load_documents("gutenberg", split="test", data_dir=data_dir):
        ids = tok.encode(text)
        if len(ids) >= args.length:
            docs.append(np.asarray(ids[:args.length], dtype=np.int64))
    if len(docs) < 2:
        raise NewLLMError(f"only {len(docs)} Gutenberg test documents hold {args.length} tokens")
    print(f"{len(docs)} books x {args.length} tokens; memory layers {mem}", flush=True)
    res: dict = {"run": str(run), "model": stages[-1].parent.name, "memory_layers": mem, "n_docs": len(docs),
                 "length": args.length, "edges": edges, "surgery": cfg.surgery.options}
    losses = {"original": doc_losses(original, docs), "retrofit": doc_losses(retrofit, docs)}
    for i in mem:
        retrofit.layers[i].memory_enabled = False
    losses["memory_off"] = doc_losses(retrofit, docs)
    for i in mem:
        retrofit.layers[i].memory_enabled = True
    bins = []
    for a, b in zip(edges[:-1], edges[1:]):
        row = {"from": a, "to": b}
        for k, v in losses.items():
            row[k] = float(v[:, a:b].mean())
        gain = losses["memory_off"][:, a:b].mean(1) - losses["retrofit"][:, a:b].mean(1)  # per document
        row["memory_gain"] = float(gain.mean())
        row["memory_gain_ci95"] = float(1.96 * gain.std(ddof=1) / math.sqrt(len(gain)))
        gap = losses["retrofit"][:, a:b].mean(1) - losses["original"][:, a:b].mean(1)
        row["vs_original"] = float(gap.mean())
        row["vs_original_ci95"] = float(1.96 * gap.std(ddof=1) / math.sqrt(len(gap)))
        bins.append(row)
        print(f"positions {a:>5}-{b:<5} original {row['original']:.4f}  retrofit {row['retrofit']:.4f}  memory off "
              f"{row['memory_off']:.4f}  memory gain {row['memory_gain']:+.4f} +- {row['memory_gain_ci95']:.4f}",
              flush=True)
    res["loss_by_position"] = bins

    from newllm.eval.passkey import passkey_eval

    lengths = [int(x) for x in args.passkey_lengths.split(",")]
    depths = [float(x) for x in args.passkey_depths.split(",")]
    res["passkey"] = {"lengths": lengths, "depths": depths, "n_per_cell": args.passkey_n}
    for name, model, off in (("original", original, False), ("retrofit", retrofit, False),
                             ("memory_off", retrofit, True)):
        for i in mem:
            retrofit.layers[i].memory_enabled = not off
        r = passkey_eval(model, tok, lengths, depths, n_per_cell=args.passkey_n, progress=False)
        res["passkey"][name] = {"accuracy": r.accuracy, "overall": r.overall,
                                "examples": [s["generated"] for s in r.samples[:3]]}
        print(f"passkey {name}: {r.overall:.3f} {r.accuracy}", flush=True)
    for i in mem:
        retrofit.layers[i].memory_enabled = True
    _plot(run / "memory_use.png", bins)
    if out is not None:
        write_json(out, res)  # atomic: a killed run leaves the old file or the new one
    return 0


def _plot(path: Path, bins) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [f"{b['from']}-{b['to']}" for b in bins]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k in ("original", "retrofit", "memory_off"):
        ax.plot(x, [b[k] for b in bins], "o-", label=k.replace("_", " "))
    ax.set_xlabel("position in the book (tokens)")
    ax.set_ylabel("mean next-token loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except NewLLMError as e:
        raise SystemExit(f"{Path(__file__).name}: error: {e}") from None
