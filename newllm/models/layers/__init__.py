"""Layer types: blocks (blocks.py) x token mixers (attention.py, memory.py). Each layer-type file
defines one type and registers its name; import it here."""
from newllm.models.layers.attention import KVCache, SoftmaxAttention
from newllm.models.layers.base import LAYER_REGISTRY, BaseLayer, StateField, build_layer, register_layer
from newllm.models.layers.blocks import Block, RMSNorm, TokenMixer
from newllm.models.layers.memory import MemoryLayer, MemoryLayerConfig, MemoryMixer, MemoryPart
from newllm.models.layers.infini import InfiniLayer, InfiniLayerConfig, InfiniState
from newllm.models.layers.llama import LlamaLayer, LlamaLayerConfig
from newllm.models.layers.pythia import PythiaLayer, PythiaLayerConfig
from newllm.models.layers.multi_memory import MultiMemoryLayer, MultiMemoryLayerConfig, MultiMemoryState
from newllm.models.layers.hierarchical import HierarchicalLayer, HierarchicalLayerConfig, HierarchicalState
from newllm.models.layers.adapter import ParallelAdapter, ParallelAdapterConfig
from newllm.models.layers.window_memory import WindowMemoryLayer, WindowMemoryLayerConfig, WindowMemoryState

__all__ = [
    "LAYER_REGISTRY", "BaseLayer", "StateField", "build_layer", "register_layer",
    "Block", "TokenMixer", "RMSNorm", "KVCache", "SoftmaxAttention",
    "MemoryLayer", "MemoryLayerConfig", "MemoryMixer", "MemoryPart",
    "PythiaLayer", "PythiaLayerConfig", "LlamaLayer", "LlamaLayerConfig",
    "InfiniLayer", "InfiniLayerConfig", "InfiniState",
    "MultiMemoryLayer", "MultiMemoryLayerConfig", "MultiMemoryState",
    "HierarchicalLayer", "HierarchicalLayerConfig", "HierarchicalState",
    "ParallelAdapter", "ParallelAdapterConfig", "WindowMemoryLayer", "WindowMemoryLayerConfig", "WindowMemoryState",
]
