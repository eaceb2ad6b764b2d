"""Evaluation: sliding-window perplexity (later: reversal, passkey, prompt checks)."""
from newllm.eval.perplexity import PerplexityResult, sliding_window_perplexity, window_plan

__all__ = ["PerplexityResult", "sliding_window_perplexity", "window_plan"]
