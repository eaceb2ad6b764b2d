"""Optional `transformers` integration (`pip install newllm[hf]`): newllm models as Hugging Face models.

`import newllm.hf` registers `NewLLMConfig` (`model_type="newllm"`) with `AutoConfig` and
`NewLLMForCausalLM` with `AutoModelForCausalLM` (flash-linear-attention's pattern), so a folder written
by `save_pretrained` loads with `AutoModelForCausalLM.from_pretrained(folder)` in any process that
imported `newllm.hf`. See docs/hf.md.

* `to_hf(model)`: wrap a newllm model (config.py, model.py);
* `export_native(model, folder)`: write a pure Pythia / Llama stack as a native `GPTNeoXForCausalLM` /
  `LlamaForCausalLM` folder that loads with no newllm at all (native.py);
* `hf_tokenizer(tok)`: a newllm tokenizer as a `PreTrainedTokenizerFast` (tokenizer.py).

`newllm.models` stays free of transformers: only this package imports it.
"""
from __future__ import annotations

try:
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError as e:  # pragma: no cover - depends on the environment
    from newllm.errors import NewLLMError

    raise NewLLMError(f"newllm.hf needs the optional 'transformers' package: pip install 'newllm[hf]' ({e})") from None

from newllm.hf.config import NewLLMConfig
from newllm.hf.model import NewLLMCausalLMOutput, NewLLMForCausalLM, to_hf
from newllm.hf.native import export_native
from newllm.hf.tokenizer import hf_tokenizer

AutoConfig.register(NewLLMConfig.model_type, NewLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(NewLLMConfig, NewLLMForCausalLM, exist_ok=True)

__all__ = ["NewLLMConfig", "NewLLMForCausalLM", "NewLLMCausalLMOutput", "to_hf", "export_native", "hf_tokenizer"]
