"""Layer types. Each file defines one type and registers its name; import it here."""
from newllm.models.layers.base import LAYER_REGISTRY, BaseLayer, KVCache, build_layer, register_layer
from newllm.models.layers.infini import InfiniLayer, InfiniLayerConfig, InfiniState
from newllm.models.layers.llama import LlamaLayer, LlamaLayerConfig, RMSNorm
from newllm.models.layers.pythia import PythiaLayer, PythiaLayerConfig
from newllm.models.layers.multi_memory import MultiMemoryLayer, MultiMemoryLayerConfig, MultiMemoryState
from newllm.models.layers.hierarchical import HierarchicalLayer, HierarchicalLayerConfig, HierarchicalState

__all__ = [
    "LAYER_REGISTRY", "BaseLayer", "KVCache", "build_layer", "register_layer",
    "PythiaLayer", "PythiaLayerConfig", "LlamaLayer", "LlamaLayerConfig", "RMSNorm",
    "InfiniLayer", "InfiniLayerConfig", "InfiniState",
    "MultiMemoryLayer", "MultiMemoryLayerConfig", "MultiMemoryState",
    "HierarchicalLayer", "HierarchicalLayerConfig", "HierarchicalState",
]
