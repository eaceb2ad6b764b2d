"""`run_retrofit(cfg)`: surgery, then each stage, with the debug checklist after each (`newllm retrofit`).

Run folder::

    RUN_DIR/config.yaml                  the recipe as run (what --resume reads back)
    RUN_DIR/baseline.json                the original model: PPL, completions (computed once)
    RUN_DIR/stages/00_surgery/           report.md / report.json / plots right after the swap
    RUN_DIR/stages/01_<name>/            checkpoints/ (the Trainer's), metrics.jsonl, model/ (the
                                         stage's result, LoRA merged), report.*, done.json
    RUN_DIR/results.json                 baseline.valid_ppl, retrofit.valid_ppl, every stage's figures
    RUN_DIR/report.md                    one table over the stages

A finished stage (done.json) is never run again: `--resume RUN_DIR` loads the last finished stage's
model and continues the unfinished stage from its last checkpoint. A RUN_DIR that holds a run is
never overwritten; `--resume` it, or choose another.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from newllm.errors import NewLLMError
from newllm.retrofit.config import RetrofitConfig, resolve_model_path
from newllm.files import write_json, write_text
from newllm.retrofit.report import evaluate, write_report

STAGES_DIR = "stages"


def _save_model_atomic(model, folder: Path, metadata: dict) -> None:
    from newllm.checkpoints.native import save_model

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, metadata=metadata)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _stage_dir(run_dir: Path, k: int, name: str) -> Path:
    return run_dir / STAGES_DIR / f"{k:02d}_{name}"


def _state_bytes(model, tokens, lengths: list[int], chunk: int) -> dict[int, int]:
    out = {}
    device = next(model.parameters()).device
    for T in lengths:
        ids = torch.as_tensor(tokens[:T].astype("int64"), device=device)[None]
        with torch.no_grad(), model.memory_aside(train=False):
            model.reset_memory()
            for a in range(0, T, chunk):
                model(ids[:, a:a + chunk], update_memory=True, logits_to_keep=1)
            out[T] = int(sum(model.memory_size_bytes()))
    return out


def _train_rows(stage_dir: Path) -> list[dict]:
    """The stage's logged training rows (metrics.jsonl): loss, lr, gate values, numerics per step."""
    f = stage_dir / "metrics.jsonl"
    if not f.exists():
        return []
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train" and "loss" in r]


def run_retrofit(cfg: RetrofitConfig, resume: bool = False, stop_after: dict | None = None,
                 data_dir=None) -> dict[str, Any]:
    """Run (or, with `resume`, continue) the recipe; returns results.json's content. `stop_after`
    {"stage": name, "steps": n} stops that stage after n steps with a checkpoint (what a kill leaves),
    for tests."""
    from newllm import load_pretrained, load_tokenizer
    from newllm.data.corpora import find_data_dir, load_tokens, scored_text, separator_id
    from newllm.retrofit.stages import StageTrainer
    from newllm.retrofit.surgery import memory_from_attention
    from newllm.train.config import dump_yaml
    from newllm.train.loop import resolve_device, seed_all

    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NewLLMError(f"{run_dir}: run_dir exists and is not a folder")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise NewLLMError(f"{run_dir}: already holds a run; continue it with --resume {run_dir}, or set another "
                          "run_dir (nothing was changed)")
    if resume and not (run_dir / "config.yaml").is_file():
        raise NewLLMError(f"{run_dir}: no config.yaml, so not a retrofit run folder to resume")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data_dir = find_data_dir(data_dir or cfg.data_dir)
    model_path = resolve_model_path(cfg.model.path, data_dir)
    tok_path = Path(cfg.model.tokenizer) if cfg.model.tokenizer else (
        model_path if model_path.is_file() else model_path / "tokenizer.json")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", dump_yaml(cfg.to_dict()))
    seed_all(cfg.seed)
    device = resolve_device(cfg.device)
    tok = load_tokenizer(tok_path)
    print(f"newllm retrofit: loading {model_path}", flush=True)
    teacher = load_pretrained(model_path).to(device).eval()
    n = len(teacher.layers)
    layers = cfg.surgery.resolve_layers(n)
    ev = cfg.eval
    load = dict(tokenizer=tok, data_dir=data_dir, cache_dir=cfg.cache_dir)
    valid = load_tokens(ev.corpus, ev.split, **load)
    if ev.max_tokens is not None:
        valid = valid[:ev.max_tokens]
    valid_ids = torch.from_numpy(valid.astype("int64"))
    valid_text = scored_text(valid, tok, separator_id(tok))
    train_tokens = load_tokens(cfg.corpus, "train", **load)

    settings = {"model": str(model_path), "corpus": ev.corpus, "split": ev.split, "tokens": int(len(valid)),
                "context": ev.context, "stride": ev.stride, "prompts": ev.prompts, "max_new_tokens": ev.max_new_tokens}
    base_file = run_dir / "baseline.json"
    baseline = json.loads(base_file.read_text()) if base_file.is_file() else None
    if baseline is None or baseline.get("settings") != settings:
        from newllm.retrofit.report import completions, perplexity

        t0 = time.perf_counter()
        baseline = {"settings": settings, "ppl": perplexity(teacher, valid_ids, valid_text, ev, cfg.progress),
                    "completions": completions(teacher, tok, ev.prompts, ev.max_new_tokens)}
        baseline["eval_s"] = time.perf_counter() - t0
        write_json(base_file, baseline)
    print(f"newllm retrofit: original token PPL {baseline['ppl']['token_ppl']:.3f} on {len(valid):,} "
          f"{ev.corpus} {ev.split} tokens (context {ev.context}, stride {ev.stride})", flush=True)

    student = memory_from_attention(teacher, layers, kind=cfg.surgery.kind, adapter=cfg.surgery.adapter,
                                    alpha_init=cfg.surgery.alpha_init, init=cfg.surgery.init,
                                    **cfg.surgery.options).to(device)
    summary: list[dict[str, Any]] = []
    surgery_dir = _stage_dir(run_dir, 0, "surgery")
    if ev.after_surgery:
        done = surgery_dir / "done.json"
        if done.is_file():
            summary.append(json.loads(done.read_text()))
        else:
            res = evaluate(student, teacher, tok, ev, valid_ids, valid_text, baseline, progress=cfg.progress)
            extra = {"stage": "surgery (no training)", "layers": layers, "kind": cfg.surgery.kind,
                     "adapter": cfg.surgery.adapter}
            write_report(surgery_dir, "After the surgery, before any training", res, baseline, None, extra)
            row = {"stage": "surgery", "kind": "surgery", "valid_ppl": res["ppl"]["token_ppl"],
                   "ratio": res["ppl"]["ratio"], "memory_off_ppl": res.get("memory_off", {}).get("token_ppl"),
                   "train_tokens": 0, "train_s": 0.0, "checks": res["checks"]}
            write_json(done, row)
            summary.append(row)

    for k, stage in enumerate(cfg.stages, start=1):
        folder = _stage_dir(run_dir, k, stage.name)
        done = folder / "done.json"
        if done.is_file():
            from newllm.checkpoints.native import load_model

            student = load_model(folder / "model").to(device)
            summary.append(json.loads(done.read_text()))
            continue
        tokens = train_tokens if stage.train_tokens is None else train_tokens[:stage.train_tokens]
        trainer = StageTrainer(stage, student, teacher, layers, tokens, folder, cfg, str(tok_path))
        latest = folder / "checkpoints" / "latest"
        if latest.is_file():
            from newllm.train.checkpoint import find_checkpoint

            trainer.load(find_checkpoint(folder))
            print(f"newllm retrofit: stage {stage.name} resumed at step {trainer.step}", flush=True)
        print(f"newllm retrofit: stage {k} {stage.name} ({stage.kind}): {stage.steps} steps, "
              f"{trainer.cfg.tokens_per_step:,} tokens/step, groups "
              + ", ".join(f"{g['name']} {len(g['params'])} tensors lr {g['base_lr']:g}"
                          for g in trainer.optimizer.param_groups), flush=True)
        steps = stop_after["steps"] if stop_after and stop_after.get("stage") == stage.name else None
        trainer.run(stop_after=steps)
        if not trainer.done():
            trainer.metrics.close()
            return {"stopped": stage.name, "step": trainer.step}
        trainer.metrics.close()
        student = trainer.model
        if stage.kind == "lora":
            from newllm.retrofit.lora import merge_lora

            merge_lora(student)
        for p in student.parameters():
            p.requires_grad_(True)
        _save_model_atomic(student, folder / "model", {"stage": stage.name, "step": trainer.step})
        res = evaluate(student, teacher, tok, ev, valid_ids, valid_text, baseline, skipped_steps=trainer.skipped,
                       progress=cfg.progress)
        extra = {"stage": f"{k} {stage.name} ({stage.kind})", "layers": layers, "steps": trainer.step,
                 "training tokens": trainer.tokens, "train seconds": round(trainer.elapsed_s, 1),
                 "distinct training tokens": int(len(tokens))}
        write_report(folder, f"After stage {k}: {stage.name}", res, baseline, _train_rows(folder), extra)
        row = {"stage": stage.name, "kind": stage.kind, "valid_ppl": res["ppl"]["token_ppl"],
               "word_ppl": res["ppl"]["word_ppl"], "bits_per_byte": res["ppl"]["bits_per_byte"],
               "ratio": res["ppl"]["ratio"], "memory_off_ppl": res.get("memory_off", {}).get("token_ppl"),
               "train_tokens": trainer.tokens, "distinct_train_tokens": int(len(tokens)),
               "train_s": trainer.elapsed_s, "skipped_steps": trainer.skipped, "gates": res["gates"],
               "checks": res["checks"], "first_departure": res["first_departure"]}
        write_json(done, row)
        summary.append(row)

    last = summary[-1]
    results = {"model": str(model_path), "layers": layers, "surgery": cfg.surgery.__dict__, "eval": settings,
               "baseline": {"valid_ppl": baseline["ppl"]["token_ppl"], "word_ppl": baseline["ppl"]["word_ppl"],
                            "bits_per_byte": baseline["ppl"]["bits_per_byte"]},
               "retrofit": {"valid_ppl": last["valid_ppl"], "ratio": last["ratio"],
                            "memory_off_ppl": last.get("memory_off_ppl")},
               "stages": summary,
               "train_tokens": sum(r.get("train_tokens", 0) for r in summary),
               "train_s": sum(r.get("train_s", 0.0) for r in summary)}
    if ev.state_tokens:
        results["state_bytes"] = {"original": _state_bytes(teacher, train_tokens, ev.state_tokens, ev.context),
                                  "retrofit": _state_bytes(student, train_tokens, ev.state_tokens, ev.context)}
    write_json(run_dir / "results.json", results)
    _summary_md(run_dir, results)
    return results


def _summary_md(run_dir: Path, r: dict[str, Any]) -> None:
    b = r["baseline"]["valid_ppl"]
    lines = [f"# Retrofit of {Path(r['model']).name}: layers {r['layers']} ({r['surgery']['kind']}"
             f"{', adapter' if r['surgery']['adapter'] else ''})", "",
             f"Sliding-window token PPL on the first {r['eval']['tokens']:,} {r['eval']['corpus']} "
             f"{r['eval']['split']} tokens (context {r['eval']['context']}, stride {r['eval']['stride']}). "
             f"Original: {b:.3f}.", "",
             "| stage | kind | token PPL | vs original | memory off | training tokens | train s |",
             "|---|---|---|---|---|---|---|"]
    for s in r["stages"]:
        off = s.get("memory_off_ppl")
        lines.append(f"| {s['stage']} | {s['kind']} | {s['valid_ppl']:.3f} | {s['ratio']:.4f}x | "
                     f"{'-' if off is None else f'{off:.3f}'} | {s.get('train_tokens', 0):,} | "
                     f"{s.get('train_s', 0.0):.0f} |")
    if "state_bytes" in r:
        lines += ["", "| tokens | original state | retrofit state |", "|---|---|---|"]
        for T, v in r["state_bytes"]["original"].items():
            lines.append(f"| {int(T):,} | {v / 2**20:.2f} MiB | {r['state_bytes']['retrofit'][T] / 2**20:.2f} MiB |")
    lines += ["", "Each stage's checklist: stages/*/report.md."]
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")
