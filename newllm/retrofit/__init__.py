"""Retrofitting memory into pretrained models (issue 11, in progress): surgery on a loaded model and
the no-memory baselines a memory layer has to beat. See docs/retrofit.md."""
from newllm.retrofit.surgery import memory_from_attention, memory_spec, with_layer_options

__all__ = ["memory_from_attention", "memory_spec", "with_layer_options"]
