"""Layer-by-layer numerics: trace points, statistics, comparison with another implementation.

    from newllm.diagnostics import trace_model, compare_traces
    ours = trace_model(model, ids)                        # name -> (T, C) tensor, execution order
    cmp = compare_traces(reference, ours, "same_precision")
    cmp.first_divergence                                  # None, or the point where they part

Modules: `trace` (points and statistics), `compare` (metrics, the added-error rule, tolerances),
`hf_side` (transformers), `llamacpp` (llama.cpp through llama-cpp-python's eval callback),
`quant` (requantised second models), `quant_effect` (the quantisation table), `report` (what
`newllm trace` prints and writes). docs/diagnostics.md has the details and measured numbers.
"""
from newllm.diagnostics.compare import TOLERANCES, Comparison, Tolerance, compare_traces
from newllm.diagnostics.trace import LAYER_POINTS, Trace, point_stats, trace_model, trace_stats

__all__ = ["LAYER_POINTS", "TOLERANCES", "Comparison", "Tolerance", "Trace", "compare_traces", "point_stats",
           "trace_model", "trace_stats"]
