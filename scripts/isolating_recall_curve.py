"""Diagnosis for the isolating setting: associative recall past the receptive field as training goes on.

    python scripts/isolating_recall_curve.py runs/experiment_isolating_cpu_1h --model infini_all \
        --steps 600 --every 100 --out runs/experiment_isolating_cpu_1h/recall_curve.json

Reads the run's recipe (RUN_DIR/experiment.yaml: isolating.recall, the receptive field's distance,
gate_lr) and the trained model (RUN_DIR/isolating/MODEL/final), trains a copy on recall exactly as
the experiment's `iso_recall` stage does (same batches, same lr and groups), and scores it on the
stage's held-out batches every --every steps, memory on and off. It answers whether the stage's
step budget, rather than the memory, is what keeps recall low: a curve still rising at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", default="infini_all")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the curve here (JSON); refused if it exists")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is not None and args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another --out")
    from newllm import load_pretrained, load_tokenizer
    from newllm.data.recall import make_recall_batch, recall_distance, recall_gap
    from newllm.errors import NewLLMError
    from newllm.eval.ablation import memory_switched_off
    from newllm.eval.recall import recall_eval
    from newllm.experiment.config import ExperimentConfig
    from newllm.files import write_json
    from newllm.train.config import load_yaml

    cfg = ExperimentConfig.from_dict(load_yaml(args.run_dir / "experiment.yaml"), where=str(args.run_dir))
    results = json.loads((args.run_dir / "results.json").read_text()) if (args.run_dir / "results.json").exists() else {}
    folder = args.run_dir / "isolating" / args.model / "final"
    if not folder.exists():
        raise NewLLMError(f"{folder}: no trained model there (has the experiment finished {args.model}?)")
    model = load_pretrained(folder).eval()
    tok = load_tokenizer(folder / "tokenizer.json")
    r, S = cfg.isolating.recall, cfg.isolating_segment_length
    R = (results.get("isolating") or {}).get("receptive_field") or model.receptive_field
    gap = recall_gap(math.ceil(r.distances[0] * R), r.n_pairs, S)
    kw = dict(tokenizer=tok, n_keys=r.n_keys, n_values=r.n_values)
    g_eval = torch.Generator().manual_seed(r.seed)  # the stage's held-out batches
    held = [make_recall_batch(r.n_pairs, S, r.batch_size, g_eval, n_segments_gap=gap, **kw) for _ in range(r.eval_batches)]
    g = torch.Generator().manual_seed(r.seed + 1)  # the stage's training batches

    def batches():
        while True:
            yield make_recall_batch(r.n_pairs, S, r.batch_size, g, n_segments_gap=gap, **kw)

    groups = {"gates": {"lr": cfg.gate_lr}} if cfg.gate_lr else None
    print(f"{args.model}: recall with {r.n_pairs} pairs >= {recall_distance(r.n_pairs, S, gap)} tokens back "
          f"(R = {R}), lr {r.lr}, batch {r.batch_size}, chance {1 / r.n_values:.4f}", flush=True)
    it, rows, losses, t0 = batches(), [], [], time.time()
    # one optimizer for the whole curve, over consecutive slices of one batch stream
    opt_state: dict = {}
    for done in range(0, args.steps, args.every):
        n = min(args.every, args.steps - done)
        losses += finetune_slice(model, it, n, r.lr, groups, opt_state)
        on = float(np.mean([recall_eval(model, *b) for b in held]))
        with memory_switched_off(model):
            off = float(np.mean([recall_eval(model, *b) for b in held]))
        rows.append({"steps": done + n, "accuracy": on, "accuracy_memory_off": off,
                     "loss": float(np.mean(losses[-min(n, 20):])), "seconds": round(time.time() - t0, 1)})
        print(f"  step {done + n:5d}: recall {on:.3f} (memory off {off:.3f}), loss {rows[-1]['loss']:.3f}, "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    if args.out is not None:
        write_json(args.out, {"model": args.model, "n_pairs": r.n_pairs, "gap": gap, "chance": 1 / r.n_values,
                              "lr": r.lr, "batch_size": r.batch_size, "rows": rows, "losses": losses})


def finetune_slice(model, it, steps, lr, groups, opt_state):
    """`steps` more steps of the stage's training (`newllm.train.finetune.finetune`'s step: AdamW, no
    weight decay, gradients clipped at 1), with AdamW's state kept across slices."""
    from newllm.train.optim import build_param_groups

    if "opt" not in opt_state:
        opt_state["opt"] = torch.optim.AdamW(build_param_groups(model, lr, 0.0, groups or {}), lr=lr)
    opt = opt_state["opt"]
    out = []
    model.train()
    with model.memory_aside(train=True):
        for _ in range(steps):
            ids, labels = next(it)
            loss = model(ids, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            out.append(float(loss.detach()))
    model.eval()
    return out


if __name__ == "__main__":
    from newllm.errors import NewLLMError

    try:
        main()
    except NewLLMError as e:  # bad input: one line, no traceback
        raise SystemExit(f"isolating_recall_curve: {e}") from None
