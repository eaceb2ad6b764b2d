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


def memory_read_norms(model, ids, positions=None) -> dict[str, dict[str, float]]:
    """What each memory layer's read carries: the RMS of its memory read-out A_mem and of its local
    attention A_loc (the mixer's taps), over `positions` (a (B, T) bool mask; None: every position),
    and the mean memory gate sigmoid(beta). A gate near 0, or an A_mem far smaller than A_loc,
    says the layer does not use what its memory holds. Keys `L{i}`; layers without taps are left out."""
    import torch

    taps: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        mixer = getattr(layer, "mixer", layer)
        if not layer.memory_enabled or not hasattr(mixer, "tap_memory_read"):
            continue
        taps[f"L{i}"] = {}
        for name, tap in (("memory_read", mixer.tap_memory_read), ("local", mixer.tap_local)):
            hooks.append(tap.register_forward_hook(
                lambda _m, _i, out, key=f"L{i}", name=name: taps[key].__setitem__(name, out.detach())))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[str, float]] = {}
    for i, layer in enumerate(model.layers):
        got = taps.get(f"L{i}")
        if not got or "memory_read" not in got:
            continue
        row = {}
        for name, t in got.items():
            t = t.float().reshape(t.shape[0], t.shape[1], -1)  # (B, T, features)
            sel = t if positions is None else t[positions.to(t.device)]
            row[f"{name}_rms"] = float(sel.pow(2).mean().sqrt())
        row["gate_mean"] = float(torch.stack([g.float().mean() for g in layer.gates().values()]).mean()) \
            if layer.gates() else float("nan")
        out[f"L{i}"] = row
    return out
