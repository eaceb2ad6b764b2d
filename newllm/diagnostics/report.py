"""What `newllm trace` shows: the sides, the table by layer, JSON, the growth plot, saved tensors.

    result = run_trace("model.gguf", text="The capital of France", against="transformers")
    print(format_table(result))
    write_json(result, "trace.json"); growth_plot(result, "growth.png"); save_tensors(result, "t.safetensors")

`against`: None (ours only), "transformers", "llama.cpp", "requant:Q8_0" (this model's weights
requantised with gguf's quantiser), or a second model path (another quantisation of the same
weights, or any model with the same tokenizer and depth).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from newllm.diagnostics.compare import TOLERANCES, Comparison, check_same_tokens, compare_traces
from newllm.diagnostics.trace import LAYER_POINTS, Trace, split_name, trace_model, trace_stats
from newllm.errors import NewLLMError
from newllm.files import atomic_write, check_output, json_safe, write_text

REQUANT = "requant:"


@dataclass
class TraceResult:
    model: str
    ours: Trace
    reference: Trace | None = None  # the other side (for MODEL2 / requant: the test side)
    comparison: Comparison | None = None

    def sides(self) -> list[Trace]:
        return [self.ours] + ([self.reference] if self.reference is not None else [])


def _token_ids(model_path, model, text: str | None, ids) -> list[int]:
    if (text is None) == (ids is None):
        raise NewLLMError("trace: give exactly one of --text or --ids")
    if ids is not None:
        ids = [int(i) for i in ids]
    else:
        from newllm.checkpoints import load_tokenizer

        p = Path(model_path)
        if not (p.suffix == ".gguf" or (p / "tokenizer.json").exists()):
            raise NewLLMError(f"{model_path}: no tokenizer here (a .gguf file or a folder with tokenizer.json); "
                              "give --ids")
        ids = load_tokenizer(model_path).encode(text)
    if not ids:
        raise NewLLMError("trace: the text has no tokens")
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise NewLLMError(f"trace: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return ids


def same_token_ids(side: str, theirs: list[int], ours: list[int]) -> None:
    """Raise, naming the first position, when `side` tokenised the text differently from newllm."""
    check_same_tokens(Trace(side, theirs, {}, 0), Trace("newllm", ours, {}, 0))


def check_against(against: str | None, tolerance: str | None) -> None:
    if tolerance is not None and tolerance not in TOLERANCES:
        raise NewLLMError(f"--tolerance {tolerance!r}: one of {sorted(TOLERANCES)}")
    if against is None or against in ("transformers", "llama.cpp"):
        return
    if against.startswith(REQUANT):
        from newllm.diagnostics.quant import qtype_of

        qtype_of(against[len(REQUANT):])
    elif not Path(against).exists():
        raise NewLLMError(f"--against {against!r}: not transformers, llama.cpp, requant:QTYPE or an existing model")


def run_trace(model_path, text: str | None = None, ids=None, against: str | None = None, points: str | None = None,
              tolerance: str | None = None, kv_type: str = "f16", threads: int | None = None) -> TraceResult:
    """Trace `model_path` (and the `against` side) on `text` or `ids` and compare (module docstring)."""
    from newllm.checkpoints import load_pretrained

    check_against(against, tolerance)  # bad options fail before any model is loaded
    model = load_pretrained(model_path, dtype=torch.float32).eval()
    token_ids = _token_ids(model_path, model, text, ids)
    ours = trace_model(model, token_ids, points, side="newllm")
    result = TraceResult(str(model_path), ours)
    if against is None:
        return result
    if against == "transformers":
        from newllm.diagnostics.hf_side import load_transformers_model, trace_transformers, transformers_token_ids

        hf = load_transformers_model(model_path)
        if text is not None:  # the same token ids first
            same_token_ids("transformers", transformers_token_ids(model_path, text), token_ids)
        ref = trace_transformers(hf, token_ids, points)
        kind = "same_precision"
        reference, test = ref, ours
    elif against == "llama.cpp":
        from newllm.diagnostics.llamacpp import file_is_float, llamacpp_token_ids, trace_llamacpp

        if Path(model_path).suffix != ".gguf":
            raise NewLLMError(f"{model_path}: the llama.cpp side needs a .gguf file")
        if text is not None:
            same_token_ids("llama.cpp", llamacpp_token_ids(model_path, text), token_ids)
        ref = trace_llamacpp(model_path, token_ids, points, kv_type=kv_type, threads=threads)
        kind = "llamacpp_float" if file_is_float(model_path) else "llamacpp_quantized"
        reference, test = ref, ours
    elif against.startswith(REQUANT):
        from newllm.diagnostics.quant import requantize

        qtype = against[len(REQUANT):]
        other = trace_model(requantize(model, qtype), token_ids, points, side=f"newllm {qtype.upper()}")
        kind, reference, test = "requantized", ours, other
    else:
        other = load_pretrained(against, dtype=torch.float32).eval()
        if other.config.vocab_size != model.config.vocab_size:
            raise NewLLMError(f"{against}: vocabulary {other.config.vocab_size} != {model.config.vocab_size} of "
                              f"{model_path}; a second model must share the tokenizer")
        reference, test = ours, trace_model(other, token_ids, points, side=str(against))
        kind = "requantized"
    comparison = compare_traces(reference, test, tolerance or kind)
    other_side = reference if test is ours else test
    return TraceResult(str(model_path), ours, other_side, comparison)


# ------------------------------------------------------------------ the terminal table
def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def layer_rows(trace: Trace) -> list[tuple[str, str | None]]:
    """(row label, the point that row's residual statistics come from)."""
    rows = [("embed", "embed")]
    rows += [(str(i), f"layers.{i}.resid_post") for i in range(trace.num_layers)]
    return rows + [("final_norm", "final_norm"), ("logits", "logits")]


def format_table(result: TraceResult) -> str:
    """One row per layer: the layer output's RMS, max |x| (token, channel) and max/median |x| in
    newllm's trace, the other side's RMS and max |x|, the output's NMSE / SQNR and the layer's point
    with the largest added error. The first divergence is marked `<<` and its layer expanded."""
    ours, ref, cmp = result.ours, result.reference, result.comparison
    first = cmp.first_divergence if cmp else None
    first_layer = first["layer"] if first else None
    first_label = (str(first_layer) if first_layer is not None else first["point"]) if first else None
    head = f"{'layer':>10} {'rms':>9} {'max|x|':>9} {'at (tok,ch)':>12} {'max/med':>8}"
    if ref is not None:
        head += f" {'other rms':>9} {'other max':>9} {'NMSE':>9} {'SQNR dB':>8}  {'worst added (point)':<28}"
    lines = [head, "-" * len(head)]
    for label, point in layer_rows(ours):
        t = ours.tensors.get(point)
        if t is None:
            continue
        s = trace_stats(Trace(ours.side, ours.token_ids, {point: t}, ours.num_layers))[point]
        row = (f"{label:>10} {_fmt(s['rms']):>9} {_fmt(s['max_abs']):>9} "
               f"{str(tuple(s['max_abs_at'])):>12} {_fmt(s['max_over_median'], '.1f'):>8}")
        if ref is not None:
            r = ref.tensors.get(point)
            rs = {"rms": None, "max_abs": None} if r is None else {"rms": float(r.pow(2).mean().sqrt()),
                                                                   "max_abs": float(r.abs().max())}
            m = cmp.points.get(point, {})
            layer = label if label.isdigit() else None
            inside = {n: v for n, v in cmp.points.items() if layer is not None and split_name(n)[0] == int(layer)}
            if not inside and point in cmp.points:
                inside = {point: cmp.points[point]}
            worst = max(inside.items(), key=lambda kv: kv[1]["added_nmse"]) if inside else None
            worst_s = f"{_fmt(worst[1]['added_nmse'], '.2e')} ({split_name(worst[0])[1]})" if worst else "-"
            row += (f" {_fmt(rs['rms']):>9} {_fmt(rs['max_abs']):>9} {_fmt(m.get('nmse'), '.2e'):>9} "
                    f"{_fmt(m.get('sqnr_db'), '.1f'):>8}  {worst_s:<28}")
            if label == first_label:
                row += " <<"
        lines.append(row)
    if cmp is not None:
        lines.append("")
        lines.append(f"reference: {cmp.reference}   test: {cmp.test}   tolerance {cmp.tolerance.name}: added NMSE "
                     f"> {cmp.tolerance.nmse:g} ({cmp.tolerance.why})")
        if first is None:
            lines.append("first divergence: none")
        else:
            lines.append(f"first divergence: {first['point']} (NMSE {first['nmse']:.3e}, its inputs' "
                         f"{first['input_nmse']:.3e}, added {first['added_nmse']:.3e})")
            prefix = f"layers.{first_layer}." if first_layer is not None else None
            lines.append(f"{'point':>26} {'NMSE':>10} {'added':>10} {'SQNR dB':>8} {'cosine':>10} {'max|diff|':>10}")
            for name, m in cmp.points.items():
                if (prefix and name.startswith(prefix)) or name == first["point"]:
                    mark = " <<" if name == first["point"] else ""
                    sqnr = _fmt(m["sqnr_db"], ".1f")
                    lines.append(f"{name:>26} {m['nmse']:>10.3e} {m['added_nmse']:>10.3e} {sqnr:>8} "
                                 f"{m['cosine']:>10.7f} {m['max_abs_diff']:>10.3e}{mark}")
        if cmp.logits:
            lg = cmp.logits
            lines.append(f"logits over {lg['tokens']} tokens: KL {lg['kl']:.3e} (max {lg['kl_max']:.3e}), same top-1 "
                         f"{100 * lg['top1_agreement']:.1f}%, top-5 overlap {100 * lg['top5_overlap']:.1f}%")
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------ files
def check_outputs(paths, force: bool) -> None:
    """Refuse to overwrite an existing file unless `force`, and any non-regular file (newllm.files)."""
    for p in paths:
        if p is not None:
            check_output(p, force)


def to_json(result: TraceResult) -> dict:
    out = {"model": result.model, "token_ids": result.ours.token_ids, "layer_points": list(LAYER_POINTS),
           "sides": {t.side: {"meta": t.meta, "stats": trace_stats(t)} for t in result.sides()}}
    if result.comparison is not None:
        out.update(result.comparison.to_json())
    return json_safe(out)[0]


def write_json(result: TraceResult, path) -> None:
    write_text(path, json.dumps(to_json(result), indent=1, allow_nan=False))


def growth(trace: Trace) -> tuple[list[int], list[float], list[float], list[float]]:
    """Layer index, RMS, max |x| and RMS without position 0 of each layer's output (resid_post)."""
    xs, rms, mx, rest = [], [], [], []
    for i in range(trace.num_layers):
        t = trace.tensors.get(f"layers.{i}.resid_post")
        if t is not None:
            xs.append(i)
            rms.append(float(t.pow(2).mean().sqrt()))
            mx.append(float(t.abs().max()))
            rest.append(float(t[1:].pow(2).mean().sqrt()) if t.shape[0] > 1 else math.nan)
    return xs, rms, mx, rest


def growth_plot(result: TraceResult, path, extra: list[Trace] = ()) -> None:
    """RMS and max |x| of the residual stream by layer, one line per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for trace, style in zip([*result.sides(), *extra], ["-o", "--s", ":^", "-.v"]):
        xs, rms, mx, rest = growth(trace)
        if not xs:
            raise NewLLMError("growth plot: no layers.{i}.resid_post points traced (check --points)")
        for ax, ys in zip(axes, (rms, mx, rest)):
            ax.plot(xs, ys, style, label=trace.side, markersize=3)
    for ax, title in zip(axes, ["RMS of the layer output", "max |x| of the layer output",
                                "RMS without position 0"]):
        ax.set_xlabel("layer")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{Path(result.model).name}: residual stream by layer ({len(result.ours.token_ids)} tokens)")
    fig.tight_layout()
    atomic_write(p, lambda tmp: fig.savefig(tmp, format=p.suffix.lstrip(".") or "png", dpi=110))
    plt.close(fig)


def save_tensors(result: TraceResult, path) -> None:
    """The traced points' full (T, C) tensors as safetensors, keys `{side}/{point}`."""
    from safetensors.torch import save_file

    tensors = {f"{t.side}/{name}": x.contiguous() for t in result.sides() for name, x in t.tensors.items()}
    meta = {"model": result.model, "token_ids": json.dumps(result.ours.token_ids),
            "sides": json.dumps([t.side for t in result.sides()])}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

