"""Retrofitting memory into pretrained models (issue 11; docs/retrofit.md).

* `surgery`: attention layers of a loaded model become memory layers initialised from them, or
  parallel adapters; layer options (windows, sinks) changed on the same weights;
* `transfer`: attention transfer of single layers on the teacher's inputs;
* `stages`, `run`: the staged trainer and `newllm retrofit` (`run_retrofit`);
* `lora` (PEFT), `guards` (NaN/Inf and fp16-overflow counts), `report` (seed 000's checklist).
"""
from newllm.retrofit.surgery import memory_from_attention, memory_spec, with_layer_options

__all__ = ["memory_from_attention", "memory_spec", "with_layer_options"]
