"""The memory-off ablation: the same weights with every compressive memory switched off.

Every task that asks what a memory carried (loss by position, passkey and recall beyond the
receptive field, the retrofit checklist) runs once as the model is and once inside
`memory_switched_off(model)`; the difference is the memory's.
"""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def memory_switched_off(model):
    """Every compressive-memory layer switched off (`memory_enabled = False`: no read, no write)
    inside the block; yields how many layers that is.

    The ablation that shows what the memory contributes: the same weights, the memory read-out set
    to zero. That is what every layer reads during its first segment anyway (an empty memory reads
    as 0), so the ablated model stays on ground it was trained on."""
    layers = [layer for layer in model.layers if layer.memory_enabled]  # the layers with a memory switched on
    before = [layer.memory_enabled for layer in layers]
    try:
        for layer in layers:
            layer.memory_enabled = False
        yield len(layers)
    finally:
        for layer, b in zip(layers, before):
            layer.memory_enabled = b


def has_memory(model) -> bool:
    """Whether any layer of `model` has a compressive memory switched on (so an ablation means something)."""
    return any(layer.memory_enabled for layer in model.layers)
