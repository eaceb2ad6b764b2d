"""SmolLM2-135M layer by layer: newllm vs transformers vs llama.cpp, growth with depth, and the
quantisation table (docs/diagnostics.md reports what this printed).

    .venv/bin/python scripts/diagnostics_smollm.py [--gguf FILE] [--data-dir ../shared] [--out runs/diagnostics_smollm]
        [--tokens 16384] [--window 512] [--skip-quant]

Needs transformers and llama-cpp-python (`pip install -e '.[dev,llamacpp]'`, see README). Writes
into --out: trace_*.txt (the terminal tables), trace_*.json, growth.png, gaps.md (where the
llama.cpp gap enters, by kind of point), growth.md, quant.json and quant.md. Files already there
are reused (F32 / Q8_0 / Q4_K_M GGUF copies) or replaced (reports).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from newllm.checkpoints import load_pretrained, load_tokenizer  # noqa: E402
from newllm.data.corpora import find_data_dir, source_files, read_text  # noqa: E402
from newllm.diagnostics.compare import compare_traces  # noqa: E402
from newllm.diagnostics.report import TraceResult, format_table, growth, growth_plot, to_json  # noqa: E402
from newllm.diagnostics.trace import split_name, trace_model  # noqa: E402


def wikitext_tokens(tok, data_dir, n: int) -> list[int]:
    text = "".join(read_text(f) for f in source_files("wikitext-2", "valid", data_dir))
    ids = tok.encode(text[: n * 8])
    if len(ids) < n:
        raise SystemExit(f"WikiText-2 valid gave {len(ids)} tokens, need {n}")
    return ids[:n]


def gap_table(cmps: dict) -> str:
    """Median NMSE and added NMSE per kind of point over all layers, one column pair per comparison."""
    kinds = []
    for c in cmps.values():
        for name in c.points:
            k = split_name(name)[1]
            if k not in kinds:
                kinds.append(k)
    head = "| point | " + " | ".join(f"{n}: NMSE | added" for n in cmps) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(cmps))]
    for k in kinds:
        row = [k]
        for c in cmps.values():
            ms = [m for name, m in c.points.items() if split_name(name)[1] == k]
            if not ms:
                row += ["-", "-"]
                continue
            row += [f"{statistics.median(m['nmse'] for m in ms):.2e}",
                    f"{statistics.median(m['added_nmse'] for m in ms):.2e}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=str(ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default=str(ROOT / "runs" / "diagnostics_smollm"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--trace-tokens", type=int, default=128)
    ap.add_argument("--skip-quant", action="store_true")
    ap.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores; 1 on a busy machine)")
    args = ap.parse_args()
    from newllm.diagnostics.hf_side import load_transformers_model, trace_transformers
    from newllm.diagnostics.llamacpp import llamacpp_quantize, trace_llamacpp
    from newllm.diagnostics.quant import requantize
    from newllm.diagnostics.quant_effect import (llamacpp_variant, newllm_variant, quantisation_effect,
                                                 windows_of, write_float_gguf)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = Path(args.gguf)
    data_dir = find_data_dir(args.data_dir)
    tok = load_tokenizer(gguf)
    tokens = wikitext_tokens(tok, data_dir, max(args.tokens, args.trace_tokens))
    ids = tokens[: args.trace_tokens]
    f32 = out / "smollm2-f32.gguf"
    if not f32.exists():
        write_float_gguf(gguf, f32)

    # ---------------------------------------------------------------- traces
    ours_model = load_pretrained(gguf, dtype=torch.float32).eval()
    ours = trace_model(ours_model, ids)
    hf = trace_transformers(load_transformers_model(gguf), ids)
    lc = trace_llamacpp(gguf, ids, threads=args.threads, side="llama.cpp Q4_1")
    lc_f32kv = trace_llamacpp(gguf, ids, kv_type="f32", threads=args.threads, side="llama.cpp Q4_1 kv=f32")
    lc_file32 = trace_llamacpp(f32, ids, kv_type="f32", threads=args.threads, side="llama.cpp F32 kv=f32")
    lc_file32_f16 = trace_llamacpp(f32, ids, kv_type="f16", threads=args.threads, side="llama.cpp F32 kv=f16")
    cmps = {
        "transformers": compare_traces(hf, ours, "same_precision"),
        "llama.cpp Q4_1": compare_traces(lc, ours, "llamacpp_quantized"),
        "llama.cpp Q4_1 kv=f32": compare_traces(lc_f32kv, ours, "llamacpp_quantized"),
        "llama.cpp F32 kv=f16": compare_traces(lc_file32_f16, ours, "llamacpp_float"),
        "llama.cpp F32 kv=f32": compare_traces(lc_file32, ours, "llamacpp_float"),
    }
    refs = {"transformers": hf, "llama.cpp Q4_1": lc, "llama.cpp Q4_1 kv=f32": lc_f32kv,
            "llama.cpp F32 kv=f16": lc_file32_f16, "llama.cpp F32 kv=f32": lc_file32}
    for name, cmp in cmps.items():
        result = TraceResult(str(gguf), ours, refs[name], cmp)
        slug = name.replace(" ", "_").replace("=", "").replace(".", "")
        (out / f"trace_{slug}.txt").write_text(format_table(result) + "\n")
        (out / f"trace_{slug}.json").write_text(json.dumps(to_json(result)))
        fd = cmp.first_divergence
        print(f"{name:24s} first divergence {fd['point'] if fd else None}  logits {cmp.logits}")
    plot = out / "growth.png"
    plot.unlink(missing_ok=True)
    growth_plot(TraceResult(str(gguf), ours, hf, cmps["transformers"]), plot, extra=[lc])
    (out / "gaps.md").write_text(gap_table({k: cmps[k] for k in list(cmps)[1:]}) + "\n")
    # growth with depth: RMS / max |x| of each layer's output for the three sides
    rows = ["| layer | newllm RMS | transformers RMS | llama.cpp RMS | newllm max abs (token, channel) | "
            "llama.cpp max abs | attn_norm max abs | mlp_out RMS |", "|---|---|---|---|---|---|---|---|"]
    g = {t.side: growth(t) for t in (ours, hf, lc)}
    for i in range(ours.num_layers):
        t = ours.tensors[f"layers.{i}.resid_post"]
        flat = int(t.abs().argmax())
        rows.append(f"| {i} | {g['newllm'][1][i]:.4g} | {g['transformers'][1][i]:.4g} | {g['llama.cpp Q4_1'][1][i]:.4g} "
                    f"| {g['newllm'][2][i]:.4g} ({flat // t.shape[1]}, {flat % t.shape[1]}) | "
                    f"{g['llama.cpp Q4_1'][2][i]:.4g} | {float(ours.tensors[f'layers.{i}.attn_norm'].abs().max()):.4g} | "
                    f"{float(ours.tensors[f'layers.{i}.mlp_out'].pow(2).mean().sqrt()):.4g} |")
    rest = {i: float(ours.tensors[f"layers.{i}.resid_post"][1:].pow(2).mean().sqrt()) for i in range(ours.num_layers)}
    rows.append("")
    rows.append("RMS without position 0: " + ", ".join(f"{i}: {v:.3g}" for i, v in rest.items()))
    per_layer = (rest[ours.num_layers - 1] / rest[0]) ** (1 / (ours.num_layers - 1))
    rows.append(f"geometric growth per layer without position 0 (layer 0 -> {ours.num_layers - 1}): x{per_layer:.4f}")
    (out / "growth.md").write_text("\n".join(rows) + "\n")
    print((out / "gaps.md").read_text())
    print((out / "growth.md").read_text())
    if args.skip_quant:
        return 0

    # ---------------------------------------------------------------- quantisation table
    q4km = out / "smollm2-q4_k_m.gguf"
    for path, ftype in ((q4km, "Q4_K_M"),):
        if not path.exists():
            llamacpp_quantize(f32, path, ftype)
    points = r"resid_post$|final_norm|logits"
    windows = windows_of(tokens, args.window, args.tokens // args.window)
    reference = newllm_variant("newllm F32 (Q4_1 dequantised)", ours_model, points)
    variants = [
        newllm_variant("newllm Q8_0 (gguf quantiser)", requantize(ours_model, "Q8_0"), points),
        newllm_variant("newllm Q4_K_M weights (llama.cpp quantiser)", load_pretrained(q4km, dtype=torch.float32).eval(),
                       points),
        llamacpp_variant("llama.cpp F32 file", f32, points, threads=args.threads),
        llamacpp_variant("llama.cpp Q4_1 file", gguf, points, threads=args.threads),
        llamacpp_variant("llama.cpp Q4_K_M", q4km, points, threads=args.threads),
    ]
    effect = quantisation_effect(reference, variants, windows)
    (out / "quant.json").write_text(json.dumps(effect, indent=1, default=lambda x: None))
    L = ours.num_layers
    show = [0, 1, 2, 5, 10, 15, 20, 25, L - 1]
    head = ("| variant | KL | same top-1 | NLL/token | PPL | " + " | ".join(f"SQNR L{i}" for i in show)
            + " | SQNR final_norm | SQNR logits |")
    lines = [f"{effect['tokens']} WikiText-2 valid tokens, {effect['windows']} windows of {effect['window']}; "
             f"reference: {effect['reference']}", "", head, "|" + "---|" * (7 + len(show))]
    for name, v in effect["variants"].items():
        sq = v["layer_sqnr_db"]
        cells = ["-"] * (len(show) + 2) if sq is None else [f"{sq[i]:.1f}" for i in show] + [f"{sq[L]:.1f}",
                                                                                            f"{sq[L + 1]:.1f}"]
        lines.append(f"| {name} | {v['kl']:.3e} | {100 * v['top1_agreement']:.2f}% | {v['nll']:.4f} | {v['ppl']:.3f} | "
                     + " | ".join(cells) + " |")
    (out / "quant.md").write_text("\n".join(lines) + "\n")
    print((out / "quant.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
