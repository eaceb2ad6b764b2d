"""Evaluation: sliding-window perplexity, the Reversal Curse, passkey retrieval, associative recall."""
from newllm.eval.perplexity import PerplexityResult, sliding_window_perplexity, window_plan

__all__ = ["PerplexityResult", "sliding_window_perplexity", "window_plan"]
