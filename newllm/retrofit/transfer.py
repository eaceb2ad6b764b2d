"""Attention transfer (LoLCATs' stage 1): train a replaced layer's new parts so that its mixer's
output matches the original mixer's, each fed the TEACHER's input (teacher forcing).

    pairs = capture_mixer_io(teacher, [layer], windows)[layer]   # (normed input, mixer output) per window
    losses = attention_transfer(student.layers[layer], pairs, steps=200, lr=1e-2)

Only the parameters the student's mixer adds to the attention it was initialised from are trained
(feature maps, window factors, gates: everything but the q/k/v/o projections); the rest of the
student layer is frozen during the call and unfrozen after. The loss is MSE on the mixer output
(before the residual), optionally scaled (LoLCATs: x1000 on per-head outputs).
"""
from __future__ import annotations

import torch
from torch import nn

from newllm.errors import NewLLMError


@torch.no_grad()
def capture_mixer_io(model, layers: list[int], windows: list[torch.Tensor], progress: bool = False):
    """{layer: [(mixer input (1, T, d), mixer output (1, T, d)) per window (1, T)]} for `layers` of
    `model`, all from one teacher pass per window."""
    from tqdm.auto import tqdm

    got: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in layers}
    handles = [model.layers[i].mixer.register_forward_hook(
        lambda _m, inp, out, i=i: got[i].append((inp[0].detach(), out[0].detach()))) for i in layers]
    try:
        with model.memory_aside(train=False):
            for ids in tqdm(windows, desc="teacher activations", disable=None if progress else True):
                model(ids, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return got


def new_parameters(mixer: nn.Module) -> list[nn.Parameter]:
    """The mixer's parameters that are not its q/k/v/o projections."""
    projections = {id(p) for lin in mixer.projections() for p in lin.parameters()}
    return [p for p in mixer.parameters() if id(p) not in projections]


def attention_transfer(layer, pairs, steps: int, lr: float = 1e-2, scale: float = 1.0, max_grad_norm: float = 1.0,
                       progress: bool = False) -> list[float]:
    """Train `layer`'s new mixer parameters for `steps` AdamW steps (cycling over `pairs`); returns
    each step's loss (MSE x scale)."""
    from tqdm.auto import tqdm

    if steps < 0 or not lr > 0 or not pairs:
        raise NewLLMError(f"attention_transfer: need steps >= 0, lr > 0 and teacher pairs; got steps={steps}, lr={lr}, "
                          f"{len(pairs)} pairs")
    mixer = layer.mixer
    params = new_parameters(mixer)
    if not params:
        raise NewLLMError(f"attention_transfer: {type(mixer).__name__} adds no parameters to train")
    was = {id(p): p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    mixer.train()
    try:
        for step in tqdm(range(steps), desc="attention transfer", disable=None if progress else True):
            x, target = pairs[step % len(pairs)]
            y, _ = mixer(x)
            loss = scale * torch.nn.functional.mse_loss(y.float(), target.float())
            if not torch.isfinite(loss):
                raise NewLLMError(f"attention_transfer: non-finite loss {float(loss)} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in layer.parameters():
            p.requires_grad_(was[id(p)])
        mixer.eval()
    return losses
