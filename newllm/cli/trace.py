"""`newllm trace MODEL --text ... [--against transformers|llama.cpp|requant:Q8_0|MODEL2]`: layer-by-layer numerics.

    newllm trace model.gguf --text "The capital of France is" --against transformers \\
        [--points 'layers\\.(0|29)\\.'] [--json t.json] [--plot growth.png] [--save-tensors t.safetensors]

Prints a table by layer (the residual stream's RMS and max |x|, and against a reference the NMSE
and the point with the largest added error, the first divergence marked `<<`); see
docs/diagnostics.md. The logic is `newllm.diagnostics.report`'s.
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("trace", help="trace every layer's activations, optionally against another implementation")
    p.add_argument("model", help="a .gguf file, a Hugging Face or newllm folder, or a preset name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to run (tokenised with the model's tokenizer)")
    src.add_argument("--ids", help="comma-separated token ids instead of --text")
    p.add_argument("--against", help="transformers, llama.cpp, requant:QTYPE (this model requantised, e.g. "
                                     "requant:Q8_0) or a second model path")
    p.add_argument("--points", help="regular expression: trace only the points it matches (re.search)")
    p.add_argument("--tolerance", help="override the pair's tolerance: same_precision, llamacpp_float, "
                                       "llamacpp_quantized, requantized")
    p.add_argument("--kv-type", default="f16", choices=["f16", "f32"], help="llama.cpp's KV cache type (default f16)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    p.add_argument("--json", help="write every statistic (and the comparison) to this JSON file")
    p.add_argument("--plot", help="write the growth plot (RMS and max |x| by layer, one line per side)")
    p.add_argument("--save-tensors", help="write the traced points' full tensors to this .safetensors file")
    p.add_argument("--force", action="store_true", help="replace existing --json/--plot/--save-tensors files")
    p.set_defaults(func=run)


def run(args) -> int:
    from newllm.diagnostics.report import (check_outputs, format_table, growth_plot, run_trace, save_tensors,
                                           write_json)
    from newllm.errors import NewLLMError

    check_outputs([args.json, args.plot, args.save_tensors], args.force)
    ids = None
    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise NewLLMError(f"--ids {args.ids!r}: expected comma-separated integers") from None
    result = run_trace(args.model, text=args.text, ids=ids, against=args.against, points=args.points,
                       tolerance=args.tolerance, kv_type=args.kv_type, threads=args.threads)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        growth_plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.save_tensors:
        save_tensors(result, args.save_tensors)
        print(f"wrote {args.save_tensors}")
    return 0
