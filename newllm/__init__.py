"""newllm: a PyTorch research framework for memory-augmented language models."""
from newllm.config import ModelConfig
from newllm.errors import NewLLMError
from newllm.models import TransformerLM, create_model
from newllm.models.state import ModelMemoryState, load_memory_state, save_memory_state

__version__ = "0.1.0"


def load_pretrained(path, **kwargs):
    """Load a Hugging Face GPT-NeoX / Llama folder or a Llama-architecture .gguf file."""
    from newllm.checkpoints import load_pretrained as _load

    return _load(path, **kwargs)


def load_tokenizer(path):
    """A tokenizer with encode(text) -> list[int] and decode(ids) -> str from tokenizer.json or .gguf."""
    from newllm.checkpoints import load_tokenizer as _load

    return _load(path)


__all__ = ["ModelConfig", "NewLLMError", "TransformerLM", "create_model", "load_pretrained", "load_tokenizer",
           "ModelMemoryState", "save_memory_state", "load_memory_state"]
