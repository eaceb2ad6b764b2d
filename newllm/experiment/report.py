"""results.json, report.md (tables with one row per model) and the PNG plots of an experiment.

Plots: `loss_curves.png` (training loss against tokens), `loss_by_position.png` (mean loss at each
token position of long documents), `passkey_heatmap.png` (accuracy by prompt length x key depth,
one panel per model), `gates.png` (the memory gates of every memory layer). A figure is skipped
when no model has the data it needs (e.g. passkey disabled).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from newllm.files import atomic_write, write_json, write_text
from newllm.train.metrics import read_records

QUICK_NOTE = ("**Reduced size (`--quick`)**: a small model, a small BPE and a short token budget so that the whole "
              "run fits about 10 minutes on 2 CPU cores. The text is real (the configured corpus), but these numbers "
              "show that the pipeline works and how the models rank at this size, not what the architectures do "
              "at the seed's Pythia-70m size (run without --quick on a GPU for that).")


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _mean(xs) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(summary: dict[str, Any], figures: list[str] = ()) -> str:
    cfg, data, machine, models = summary["config"], summary["data"], summary["machine"], summary["models"]
    iso_models = list((summary.get("isolating") or {}).get("models") or cfg.get("isolating", {}).get("models", []))
    title = ", ".join(cfg["models"]) + (f" (isolating: {', '.join(iso_models)})" if iso_models else "")
    out = [f"# Experiment: {title}", ""]
    if summary["profile"] == "quick":
        out += [QUICK_NOTE, ""]
    dev = machine.get("gpu") or machine.get("cpu")
    out += [f"- Machine: {machine['device']} ({dev}), {machine['torch_threads']} torch threads, torch {machine['torch']}",
            f"- Data: {data['corpus']}, {data['train_tokens']:,} training tokens ({data['fact_tokens']:,} of them "
            f"{data['fact_documents']:,} Reversal-Curse fact sentences mixed in as documents), "
            f"{data['windows']:,} windows of {data['seq_len']} tokens x {data['epochs']} epoch(s); tokenizer vocabulary "
            f"{data['tokenizer_vocab']:,}; same seed ({cfg['seed']}) and batch order for every model",
            f"- Model overrides: `{cfg['model_overrides']}`; memory layers also: `{cfg['memory_overrides']}`",
            f"- Training: `{cfg['train']}`" + (f"; memory gates' peak lr {cfg['gate_lr']}" if cfg.get("gate_lr") else ""),
            f"- Perplexity: sliding window, context {cfg['eval']['context']}, stride {cfg['eval']['stride']}"
            + (f", first {cfg['eval']['max_tokens']:,} tokens of each split" if cfg['eval']['max_tokens'] else
               ", whole splits"), ""]
    if len(models) < len(cfg["models"]):
        out += [f"*Partial: {len(models)} of {len(cfg['models'])} models finished.*", ""]

    main = len(out)  # the main comparison's sections start here (dropped when it has no models)
    out += ["## Language modelling", ""]
    rows = []
    for name, r in models.items():
        ppl = r.get("ppl", {})
        row = [f"`{name}`", _fmt(r.get("parameters")), _fmt(r.get("train_tokens")), _fmt(r.get("final_train_loss"), 3)]
        for split in cfg["eval"]["splits"]:
            row += [_fmt(_get(ppl, split, "token_ppl")), _fmt(_get(ppl, split, "word_ppl")),
                    _fmt(_get(ppl, split, "bits_per_byte"), 3)]
        row += [_fmt(r.get("train_tokens_per_s"), 0), _fmt(_get(r, "probes", "speed", "tokens_per_s"), 0),
                _bytes(_get(r, "probes", "position", "state_bytes", "total"))]
        rows.append(row)
    header = ["model", "params", "train tokens", "final train loss"]
    for split in cfg["eval"]["splits"]:
        header += [f"{split} PPL", f"{split} word PPL", f"{split} bpb"]
    state_after = next((_get(r, "probes", "position", "state_bytes", "after_tokens") for r in models.values()), None)
    header += ["train tok/s", "infer tok/s", f"state after {_fmt(state_after)} tokens"]
    out += [_table(header, rows), ""]

    out += ["## Reversal Curse", "",
            "Seed metric: token PPL of the trained sentences (forward) and of the reversed sentences (backward, never "
            "trained); gap = backward - forward (closer to 0 is better). The backward sentences use held-out templates, "
            "so backward - held-out forward separates the direction from the wording. Paper metrics (Berglund et al. 2023) on "
            "held-out paraphrases: greedy-completion accuracy and mean log-probability of the target, name-first "
            "(forward) vs description-first (reverse).", ""]
    rows = []
    for name, r in models.items():
        rv = r.get("reversal")
        if not rv:
            continue
        held = rv.get("forward_heldout_ppl")
        rows.append([f"`{name}`", _fmt(rv.get("forward_ppl")), _fmt(rv.get("backward_ppl")), _fmt(rv.get("gap")),
                     _fmt(held), _fmt(rv["backward_ppl"] - held if held is not None else None),
                     _fmt(rv.get("forward_accuracy"), 3),
                     _fmt(rv.get("reverse_accuracy"), 3), _fmt(rv.get("forward_logprob"), 3),
                     _fmt(rv.get("reverse_logprob"), 3)])
    if rows:
        out += [_table(["model", "forward PPL", "backward PPL", "gap", "held-out forward PPL",
                        "backward - held-out forward", "forward acc",
                        "reverse acc", "forward log-prob", "reverse log-prob"], rows), ""]

    out += ["## Memory: passkey, associative recall, loss by position, gates", ""]
    rows = []
    for name, r in models.items():
        pos = _get(r, "probes", "position") or {}
        gates = []
        for layer, g in (pos.get("gates") or {}).items():
            parts = [f"{name} {min(v):.2f}-{max(v):.2f}" for name, v in g.get("gates", {}).items() if v]
            parts += [f"{name} {t['mean']:.2f}+-{t['std']:.2f}" for name, t in g.get("token_gates", {}).items()]
            gates.append(f"{layer} " + ", ".join(parts) if parts else layer)
        loss, seq = pos.get("loss") or [], data["seq_len"]
        off = pos.get("loss_memory_off")
        gain = None
        if off:
            seg = pos.get("segment_length", 0)  # in the first segment the memory is empty: no difference
            gain = _mean([a - b for a, b in zip(off[seg:], loss[seg:])])
        rows.append([f"`{name}`", _fmt(_get(r, "passkey", "overall"), 3), _fmt(_get(r, "recall", "accuracy"), 3),
                     _fmt(_mean(loss[:seq // 2]), 3), _fmt(_mean(loss[seq // 2:seq]), 3), _fmt(_mean(loss[seq:]), 3),
                     _fmt(gain, 4), "; ".join(gates) or "-"])
    seq = data["seq_len"]
    out += [_table(["model", "passkey acc", "recall acc", f"loss at positions < {seq // 2}",
                    f"loss at {seq // 2}..{seq - 1}", f"loss at >= {seq} (past training length)",
                    "memory's gain: loss with memory off - on, after the first segment",
                    "gates: per-head range (memory = sigmoid beta); per-token mean+-std (expansion = e)"], rows), ""]
    pk = cfg.get("passkey", {})
    if pk.get("enabled"):
        out += [f"Passkey: lengths {pk['lengths']}, depths {pk['depths']}, {pk['n_per_cell']} prompts per cell, "
                f"fine-tune steps {pk['finetune_steps']}. Recall: {cfg['recall']['n_pairs']} pairs in an earlier "
                f"segment than the queries, {cfg['recall']['steps']} training steps on the task; chance is "
                f"{_fmt(next((_get(r, 'recall', 'chance') for r in models.values()), None), 3)}.", ""]
    if not cfg["models"]:
        del out[main:]
    if summary.get("isolating"):
        out += isolating_markdown(summary["isolating"])
    titles = {"loss_curves.png": "Training loss", "loss_by_position.png": "Loss by token position",
              "passkey_heatmap.png": "Passkey accuracy", "gates.png": "Memory gates",
              "isolating_passkey.png": "Passkey past the receptive field: training distance x test distance",
              "isolating_gates.png": "Isolating: the memory gates over training"}
    for png in figures:
        out += [f"![{titles.get(png, png)}]({png})", ""]
    out += ["Everything above is measured in this run; `results.json` holds every number (per-position losses, "
            "per-example reversal results, per-prompt passkey answers).", ""]
    return "\n".join(out)


def _on_off(on, off, digits: int = 3) -> str:
    return _fmt(on, digits) if off is None else f"{_fmt(on, digits)} / {_fmt(off, digits)}"


def _ci(entry) -> str:
    if not entry:
        return "-"
    lo, hi = entry["ci"]
    return f"{entry['mean']:.4f}" + ("" if lo is None else f" [{lo:.4f}, {hi:.4f}]")


def isolating_markdown(iso: dict[str, Any]) -> list[str]:
    """The isolating setting's section: one row per model, what the memory carried past the receptive field."""
    R, W = iso["receptive_field"], iso["window"]
    out = ["## Isolating: the memory as the only route past the attention window", "",
           f"Every softmax layer sees a window of {W} keys; memory segments of {iso['segment_length']} tokens; "
           f"training windows of {iso['seq_len']} tokens ({iso['segments_per_window']} segments, gradients through "
           f"all of them), the state carried across {iso['carry_windows']} consecutive windows (truncated BPTT); "
           f"{iso['train_tokens']:,} training tokens per model. The tasks place their information more than "
           f"R = {R} tokens back (the largest receptive field of the windowed models: L x (W - 1) for windowed "
           "layers, S - 1 for a memory layer's local attention), where only a memory reaches. Each cell: with the "
           "memory / with it switched off (same weights).", ""]
    rows = []
    versus = iso.get("versus_window") or {}
    for key, r in iso["models"].items():
        pk, rc, pos = r.get("iso_passkey") or {}, r.get("iso_recall") or {}, r.get("iso_position") or {}
        vs = versus.get(key)
        pk_on = _mean(pk["accuracy"][0]) if pk.get("accuracy") else None
        pk_off = _mean(pk["accuracy_memory_off"][0]) if pk.get("accuracy_memory_off") and pk["accuracy_memory_off"][0] else None
        rc_on = rc["accuracy"][0] if rc.get("accuracy") else None
        rc_off = rc["accuracy_memory_off"][0] if rc.get("accuracy_memory_off") else None
        rows.append([f"`{key}`", _fmt(r.get("receptive_field")) if r.get("receptive_field") is not None else "unbounded",
                     _on_off(pk_on, pk_off), _on_off(rc_on, rc_off), _ci(pos.get("on")), _ci(pos.get("off")),
                     _ci(pos.get("gain")), f"{_ci(vs)} (vs `{vs['baseline']}`)" if vs else "-"])
    some = next(iter(iso["models"].values()), {})
    pk, rc, pos = some.get("iso_passkey") or {}, some.get("iso_recall") or {}, some.get("iso_position") or {}
    pk_head = (f"passkey at {pk['test_distances']} tokens (trained at {pk['train_distances'][0]})" if pk else "passkey")
    rc_head = (f"recall, pairs >= {rc['distances'][0]} back (chance {_fmt(rc['chance'], 3)})" if rc else "recall")
    start = pos.get("start")
    pos_head = f"loss past position {start}" if start is not None else "loss past R"
    out += [_table(["model", "receptive field", pk_head, rc_head, f"{pos_head}, memory on",
                    f"{pos_head}, memory off", "memory's gain (off - on), nats",
                    "below the window-only baseline by, nats (paired by document)"], rows), ""]
    if pos:
        out += [f"Loss: the first {pos['length']:,} tokens of {pos['n_docs']} long documents, read from an empty state "
                f"in pieces of {pos['chunk']} tokens; mean over documents of each document's mean loss at positions "
                f">= {start}, with a {pos['confidence']:.0%} bootstrap interval over documents.", ""]
    out += isolating_diagnosis(iso)
    return out


def isolating_diagnosis(iso: dict[str, Any]) -> list[str]:
    """Why a memory did or did not carry the pairs: its gates over training, what it reads at the
    answers, and the capacity sweep."""
    out = []
    history = iso.get("gate_history") or {}
    if history:
        out = ["### Diagnosis: the gates over training, what each memory layer reads, how many pairs it holds", ""]
        for key, h in history.items():
            moves = ", ".join(f"{n} {v[0]:.2f} -> {v[-1]:.2f}" for n, v in h.items()
                              if n != "steps" and v and v[0] is not None and v[-1] is not None)
            out += [f"- `{key}`, gates (mean over heads; sigmoid beta = the memory's share) from step {h['steps'][0]} "
                    f"to {h['steps'][-1]}: {moves}."]
    for key, r in iso["models"].items():
        rc = r.get("iso_recall") or {}
        if not rc.get("read_norms"):
            continue
        if not out:
            out = ["### Diagnosis: the gates over training, what each memory layer reads, how many pairs it holds", ""]
        norms = ", ".join(f"{layer} {v['memory_read_rms']:.3g} / {v['local_rms']:.3g} (gate {v['gate_mean']:.2f})"
                          for layer, v in rc["read_norms"].items())
        out += [f"- `{key}`: RMS of the memory read / of the local attention at the answer positions: {norms}."]
        cap = rc.get("capacity") or {}
        if cap.get("rows"):
            dims = sorted(set((cap.get("memory_dims") or {}).values()))
            cells = ", ".join(f"{row['n_pairs']}: {_on_off(row['accuracy'], row['accuracy_memory_off'])}"
                              for row in cap["rows"])
            out += [f"  Capacity (pairs stored: recall with / without the memory; chance {_fmt(rc['chance'], 3)}): "
                    f"{cells}. A linear memory of key dimension d holds at most d exactly readable associations "
                    f"(d orthogonal keys): d = {', '.join(map(str, dims)) or '?'} here."]
    return out + [""] if out else []


# ---------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    _plt().close(fig)


def plot_loss_curves(root: Path, names: list[str], path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for name in names:
        f = root / "models" / name / "metrics.jsonl"
        if not f.exists():
            continue
        recs = read_records(f)
        pts = [(r["tokens"], r["loss"]) for r in recs if r.get("kind") == "train" and r.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1.2, label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return True


def plot_loss_by_position(models: dict[str, Any], path: Path, seq_len: int) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for name, r in models.items():
        pos = _get(r, "probes", "position")
        if not pos or not pos.get("bin_loss"):
            continue
        edges = pos["bin_edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:]) if b > a]
        line, = ax.plot(centers, pos["bin_loss"], "o-", ms=3, label=name)
        if pos.get("bin_loss_memory_off"):
            ax.plot(centers, pos["bin_loss_memory_off"], "--", color=line.get_color(), lw=1,
                    label=f"{name}, memory off")
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.axvline(seq_len, color="gray", ls=":", lw=1, label=f"training length {seq_len}")
    ax.set_xlabel("token position in the document")
    ax.set_ylabel("mean loss (nats / token), binned")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return True


def plot_passkey(models: dict[str, Any], path: Path) -> bool:
    have = {n: r["passkey"] for n, r in models.items() if r.get("passkey")}
    if not have:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(have), figsize=(3.2 * len(have) + 1.2, 3.4), squeeze=False, sharey=True)
    for k, (ax, (name, p)) in enumerate(zip(axes[0], have.items())):
        acc = p["accuracy"]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(p["depths"])), [f"{d:g}" for d in p["depths"]])
        ax.set_yticks(range(len(p["lengths"])), [str(n) for n in p["lengths"]])
        for i, row in enumerate(acc):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
        ax.set_xlabel("key depth")
        if k == 0:
            ax.set_ylabel("prompt tokens")
        ax.set_title(f"{name}: {p.get('overall', 0):.2f}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    plt.close(fig)
    return True


def plot_gates(models: dict[str, Any], path: Path) -> bool:
    panels = [(n, layer, g) for n, r in models.items()
              for layer, g in (_get(r, "probes", "position", "gates") or {}).items()]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (name, layer, g) in zip(axes[0], panels):
        token = g.get("token_gates", {})
        for j, (gate, tg) in enumerate(token.items()):
            n = len(tg["hist"])
            ax.bar([(i + 0.5) / n for i in range(n)], [c / max(tg["n"], 1) for c in tg["hist"]], width=1 / n,
                   alpha=0.6, color=f"C{j}", label=f"{gate}, per token")
        for j, (gate, values) in enumerate(g.get("gates", {}).items()):
            for k, v in enumerate(values):
                ax.axvline(v, color=f"C{3 + j}", lw=1, label=f"{gate}, per head" if k == 0 else None)
        ax.set_xlim(0, 1)
        ax.set_xlabel("gate value")
        ax.set_ylabel("fraction of tokens" if token else "")
        ax.set_title(f"{name} {layer} ({g['type']})", fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_isolating_gates(iso: dict[str, Any] | None, path: Path) -> bool:
    """The memory gates of every isolating memory model over its training, one panel per model."""
    history = (iso or {}).get("gate_history") or {}
    if not history:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(history), figsize=(4.2 * len(history), 3.2), squeeze=False)
    for ax, (key, h) in zip(axes[0], history.items()):
        for name, values in h.items():
            if name != "steps":
                ax.plot(h["steps"], values, label=name)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("gate (mean over heads)")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_isolating_passkey(iso: dict[str, Any] | None, path: Path) -> bool:
    """Heat map per model: passkey accuracy by training distance (rows) x test distance (columns)."""
    have = {k: r["iso_passkey"] for k, r in ((iso or {}).get("models") or {}).items() if r.get("iso_passkey")}
    if not have:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(have), figsize=(3.2 * len(have) + 1.2, 0.5 * len(next(iter(have.values()))
                                                                                    ["train_distances"]) + 2.4),
                             squeeze=False)
    for ax, (key, p) in zip(axes[0], have.items()):
        acc = p["accuracy"]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(p["test_distances"])), [str(d) for d in p["test_distances"]])
        ax.set_yticks(range(len(p["train_distances"])), [str(d) for d in p["train_distances"]])
        for i, row in enumerate(acc):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
        ax.set_xlabel("test distance (tokens)")
        ax.set_ylabel("training distance (tokens)")
        ax.set_title(key, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    plt.close(fig)
    return True


def write_report(summary: dict[str, Any], root) -> None:
    root = Path(root)
    write_json(root / "results.json", summary)
    models = summary["models"]
    drawn = {"loss_curves.png": plot_loss_curves(root, list(models), root / "loss_curves.png"),
             "loss_by_position.png": plot_loss_by_position(models, root / "loss_by_position.png",
                                                           summary["data"]["seq_len"]),
             "passkey_heatmap.png": plot_passkey(models, root / "passkey_heatmap.png"),
             "gates.png": plot_gates(models, root / "gates.png"),
             "isolating_passkey.png": plot_isolating_passkey(summary.get("isolating"), root / "isolating_passkey.png"),
             "isolating_gates.png": plot_isolating_gates(summary.get("isolating"), root / "isolating_gates.png")}
    write_text(root / "report.md", report_markdown(summary, [k for k, ok in drawn.items() if ok]))
