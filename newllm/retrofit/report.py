"""Seed 000's debug checklist, run after every stage and written as report.md, report.json and plots.

    evaluate(student, teacher, tokenizer, ev, valid_ids, valid_text, baseline) -> dict

It holds, for the retrofitted model against the original:

* `completions`: greedy continuations of the prompts (seed 000's "The capital of France is",
  "1 + 1 =", "Hello, my name is"), original and retrofitted side by side;
* `layers`: per-layer output statistics on one validation window (mean, std, max |x|) of both
  models, and max |diff| / RMS diff between them: where the retrofitted model departs. Each model
  runs on its own (free-running), so a difference builds up from the first changed layer on;
* `numerics`: NaN/Inf and fp16-overflow (|x| > 65,504) counts of every layer and mixer output
  during the evaluation (`NumericWatch`), and the steps the trainer skipped;
* `ppl`: sliding-window token PPL, word PPL and bits per byte, beside the original's, and with
  the memories switched off (`memory_off`: the same weights, every memory layer's
  `memory_enabled = False`);
* `gates`: every value a layer declares as a gate (memory beta, window factors, adapter alpha);
* the stage's loss curve (a plot from its metrics.jsonl).

Checklist answers (`checks`) are written as yes / no with the number behind each.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from newllm.files import write_json, write_text
from newllm.retrofit.guards import NumericWatch


def perplexity(model, ids: torch.Tensor, text: str, ev, progress: bool = False) -> dict[str, float]:
    from newllm.eval.perplexity import sliding_window_perplexity

    model.eval()
    with torch.no_grad():
        r = sliding_window_perplexity(model, ids, context=ev.context, stride=ev.stride, batch_size=ev.batch_size,
                                      text=text, progress=progress)
    return {"token_ppl": r.token_ppl, "word_ppl": r.word_ppl, "bits_per_byte": r.bits_per_byte,
            "n_tokens": r.n_tokens}


@torch.no_grad()
def completions(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    model.eval()
    device = next(model.parameters()).device
    out = []
    with model.memory_aside(train=False):
        for p in prompts:
            ids = torch.tensor([tokenizer.encode(p)], dtype=torch.long, device=device)
            gen = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:].tolist()))
    return out


@torch.no_grad()
def layer_stats(student, teacher, ids: torch.Tensor) -> list[dict[str, float]]:
    """One row per hidden state (0 = embeddings, i = after layer i-1): both models' mean/std/max|x|
    and their max |diff| and RMS diff, on ids (1, T)."""
    rows = []
    with student.memory_aside(train=False), teacher.memory_aside(train=False):
        hs = student(ids, output_hidden_states=True, logits_to_keep=1).hidden_states
        ht = teacher(ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    for i, (a, b) in enumerate(zip(hs, ht)):
        a, b = a.float(), b.float()
        d = a - b
        rows.append({"hidden": i, "after_layer": i - 1, "orig_mean": float(b.mean()), "orig_std": float(b.std()),
                     "orig_max_abs": float(b.abs().max()), "new_mean": float(a.mean()), "new_std": float(a.std()),
                     "new_max_abs": float(a.abs().max()), "max_abs_diff": float(d.abs().max()),
                     "rms_diff": float(d.pow(2).mean().sqrt()), "rel_rms_diff": float(d.pow(2).mean().sqrt()
                                                                                      / b.pow(2).mean().sqrt())})
    return rows


def gate_values(model) -> dict[str, list[float]]:
    return {f"L{i}.{name}": [round(float(v), 6) for v in g.detach().float().flatten().tolist()]
            for i, layer in enumerate(model.layers) for name, g in layer.gates().items()}


def memory_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if layer.has_compressive_memory]


def evaluate(student, teacher, tokenizer, ev, valid_ids: torch.Tensor, valid_text: str, baseline: dict[str, Any],
             skipped_steps: int = 0, progress: bool = False) -> dict[str, Any]:
    """The checklist for `student` (see the module doc); `baseline` holds the original's ppl and
    completions (computed once per run)."""
    with NumericWatch(student, warn=False) as watch:
        ppl = perplexity(student, valid_ids, valid_text, ev, progress)
        comps = completions(student, tokenizer, ev.prompts, ev.max_new_tokens)
    res: dict[str, Any] = {"ppl": ppl, "completions": [{"prompt": p, "original": o, "retrofit": r} for p, o, r in
                                                        zip(ev.prompts, baseline["completions"], comps)]}
    res["ppl"]["ratio"] = ppl["token_ppl"] / baseline["ppl"]["token_ppl"]
    mem = memory_layers(student)
    if ev.memory_off and mem:
        for i in mem:
            student.layers[i].memory_enabled = False
        try:
            off = perplexity(student, valid_ids, valid_text, ev, progress)
        finally:
            for i in mem:
                student.layers[i].memory_enabled = True
        res["memory_off"] = {**off, "ratio": off["token_ppl"] / baseline["ppl"]["token_ppl"], "layers": mem}
    res["layers"] = layer_stats(student, teacher, valid_ids[None, :ev.stats_tokens].to(
        next(student.parameters()).device))
    res["numerics"] = {"skipped_steps": skipped_steps, **watch.totals(), "flagged": watch.flagged()}
    res["gates"] = gate_values(student)
    first = next((r for r in res["layers"] if r["rel_rms_diff"] > 1e-3), None)
    res["checks"] = {
        "language kept (PPL within 1.10x the original's)": res["ppl"]["ratio"] <= 1.10,
        "output scale like the original's (last hidden std within 2x)":
            0.5 <= res["layers"][-1]["new_std"] / max(res["layers"][-1]["orig_std"], 1e-12) <= 2.0,
        "no NaN/Inf": res["numerics"]["nonfinite"] + res["numerics"]["mixer_nonfinite"] + skipped_steps == 0,
        "no fp16 overflow": res["numerics"]["fp16_overflow"] + res["numerics"]["mixer_fp16_overflow"] == 0,
    }
    res["first_departure"] = None if first is None else first["after_layer"]
    return res


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4g}"


def write_report(folder: Path, title: str, res: dict[str, Any], baseline: dict[str, Any], rows: list[dict] | None,
                 extra: dict[str, Any] | None = None) -> None:
    """report.json, report.md and plots (loss curve, gate trajectories, per-layer departure) in
    `folder`; `rows` are the stage's logged training rows (step, loss, gate.* values)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows or []
    losses = [r["loss"] for r in rows]
    trajectories = {k: [(r["step"], r[k]) for r in rows if k in r]
                    for k in sorted({k for r in rows for k in r if k.startswith("gate.") and k.endswith(".mean")})}
    data = {"title": title, **(extra or {}), "baseline": baseline, **res,
            "training": [{"step": r["step"], "loss": r["loss"]} for r in rows], "gate_trajectories": trajectories}
    write_json(folder / "report.json", data)
    plots = _plots(folder, res, rows, trajectories)
    b, p = baseline["ppl"], res["ppl"]
    lines = [f"# {title}", ""]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Checklist (seed 000)", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in res["checks"].items()]
    lines += ["", "## Perplexity (sliding window)", "", "| model | token PPL | word PPL | bits/byte | vs original |",
              "|---|---|---|---|---|",
              f"| original | {_fmt(b['token_ppl'])} | {_fmt(b['word_ppl'])} | {_fmt(b['bits_per_byte'])} | 1x |",
              f"| retrofit | {_fmt(p['token_ppl'])} | {_fmt(p['word_ppl'])} | {_fmt(p['bits_per_byte'])} | "
              f"{_fmt(p['ratio'])}x |"]
    if "memory_off" in res:
        m = res["memory_off"]
        lines.append(f"| retrofit, memory off | {_fmt(m['token_ppl'])} | {_fmt(m['word_ppl'])} | "
                     f"{_fmt(m['bits_per_byte'])} | {_fmt(m['ratio'])}x |")
    lines += ["", "## Greedy completions", "", "| prompt | original | retrofit |", "|---|---|---|"]
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines += [f"| {esc(c['prompt'])} | {esc(c['original'])} | {esc(c['retrofit'])} |" for c in res["completions"]]
    lines += ["", "## Layer outputs against the original", "",
              f"First hidden state departing (relative RMS diff > 1e-3): after layer {res['first_departure']}.", "",
              "| after layer | orig mean | orig std | new mean | new std | max abs diff | rel RMS diff |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['after_layer'] if r['after_layer'] >= 0 else 'embed'} | {_fmt(r['orig_mean'])} | "
              f"{_fmt(r['orig_std'])} | {_fmt(r['new_mean'])} | {_fmt(r['new_std'])} | {_fmt(r['max_abs_diff'])} | "
              f"{_fmt(r['rel_rms_diff'])} |" for r in res["layers"]]
    n = res["numerics"]
    lines += ["", "## Numerics", "", f"- skipped training steps (non-finite loss or gradient): {n['skipped_steps']}",
              f"- NaN/Inf values in layer outputs: {n['nonfinite']}, in mixer outputs: {n['mixer_nonfinite']}",
              f"- values above fp16's 65,504: layers {n['fp16_overflow']}, mixers {n['mixer_fp16_overflow']}"]
    if n["flagged"]:
        lines.append(f"- flagged modules: {', '.join(sorted(n['flagged']))}")
    lines += ["", "## Gates", ""]
    for k, v in res["gates"].items():
        lines.append(f"- {k}: {', '.join(f'{x:.4f}' for x in v[:12])}{' ...' if len(v) > 12 else ''}")
    if losses:
        lines += ["", f"## Training loss: first {_fmt(losses[0])}, last {_fmt(losses[-1])}, {len(losses)} logged steps"]
    for k, pts in trajectories.items():
        lines.append(f"- {k.removeprefix('gate.').removesuffix('.mean')} (mean): step {pts[0][0]} {_fmt(pts[0][1])} -> "
                     f"step {pts[-1][0]} {_fmt(pts[-1][1])}")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    write_text(folder / "report.md", "\n".join(lines) + "\n")


def _plots(folder: Path, res: dict[str, Any], rows: list[dict], trajectories: dict[str, list]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    losses = [r["loss"] for r in rows if math.isfinite(r["loss"])]
    if losses:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([r["step"] for r in rows if math.isfinite(r["loss"])], losses)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if min(losses) > 0 else "linear")
        fig.tight_layout()
        fig.savefig(folder / "loss.png", dpi=100)
        plt.close(fig)
        out.append(folder / "loss.png")
    if trajectories:
        fig, ax = plt.subplots(figsize=(5, 3))
        for k, pts in list(trajectories.items())[:16]:
            ax.plot([a for a, _ in pts], [b for _, b in pts], label=k.removeprefix("gate.").removesuffix(".mean"))
        ax.set_xlabel("step")
        ax.set_ylabel("gate value (mean over heads)")
        if len(trajectories) <= 8:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "gates.png", dpi=100)
        plt.close(fig)
        out.append(folder / "gates.png")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["after_layer"] for r in res["layers"]], [max(r["rel_rms_diff"], 1e-12) for r in res["layers"]], "o-")
    ax.set_yscale("log")
    ax.set_xlabel("after layer (-1 = embeddings)")
    ax.set_ylabel("RMS diff / RMS original")
    fig.tight_layout()
    fig.savefig(folder / "layers.png", dpi=100)
    plt.close(fig)
    out.append(folder / "layers.png")
    return out
