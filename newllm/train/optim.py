"""AdamW parameter groups and the learning-rate schedule.

Groups (each a torch param group with a `name`):

* `decay`: weight matrices of linear projections (ndim >= 2, not an embedding) get `weight_decay`.
* `no_decay`: biases, norm weights (ndim < 2) and embeddings. Decaying a norm gain pulls it towards
  0 instead of towards the identity (1), and decaying embeddings shrinks rare tokens' rows, which
  get few gradient updates to push back (the GPT-NeoX / minGPT convention). An untied LM head is a
  linear projection and is decayed; a tied one is the embedding and is not.
* one group per name that layers request through `BaseLayer.param_groups()` (e.g. `gates` for
  Infini-attention's beta). Config `param_groups: {name: {lr, weight_decay}}` sets its learning rate
  and decay; a requested group without a config entry gets the base lr and no decay. Requested
  parameters leave the default groups. A gate stuck at sigmoid(0) = 0.5 under the shared lr and
  decay is the failure this hook exists for (DESIGN.md section 4).

Schedule: the learning rate of every group is `group_lr * f`, with
`f = step / warmup_steps` during warmup (step counted from 1), then
`f = min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`, where `min_ratio = min_lr / lr` and `p`
in [0, 1] is the fraction of the budget spent after warmup. The budget is the first of max_steps,
max_tokens and max_minutes to be reached, so `p` is the largest of the three fractions; with only
step or token budgets it is a function of the step alone (reproducible), with a wall-clock budget
it follows time (the cosine ends when the time is up).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from newllm.errors import NewLLMError
from newllm.models.layers.base import BaseLayer


def build_param_groups(model: nn.Module, lr: float, weight_decay: float,
                       group_settings: dict[str, dict[str, float]]) -> list[dict]:
    requested: dict[str, list[nn.Parameter]] = {}
    for module in model.modules():
        if isinstance(module, BaseLayer):
            for name, params in module.param_groups().items():
                requested.setdefault(name, []).extend(params)
    unknown = sorted(set(group_settings) - set(requested))
    if unknown:
        raise NewLLMError(f"param_groups: {unknown} requested by no layer of this model "
                          f"(layers request: {sorted(requested) or 'none'})")
    taken = {id(p) for params in requested.values() for p in params}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # deduplicated: a tied head appears once, as the embedding
        if not p.requires_grad or id(p) in taken or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}]
    for name, params in requested.items():
        s = group_settings.get(name, {})
        groups.append({"name": name, "params": params, "lr": float(s.get("lr", lr)),
                       "weight_decay": float(s.get("weight_decay", 0.0))})
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    groups = build_param_groups(model, cfg.lr, cfg.weight_decay, cfg.param_groups)
    # the fused kernel: one pass over each parameter for both moments and the update (CUDA and CPU;
    # FSDP2's sharded DTensor parameters too)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of each group's base lr for optimizer step `step` (1-based); see module doc."""
    if warmup_steps and step <= warmup_steps:
        return step / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def budget_progress(cfg, step: int, tokens: int, elapsed_s: float) -> float:
    """Fraction of the budget spent after warmup: the largest of the step / token / time fractions."""
    fractions = []
    w = cfg.warmup_steps
    if cfg.max_steps is not None:
        fractions.append((step - w) / max(cfg.max_steps - w, 1))
    if cfg.max_tokens is not None:
        wt = w * cfg.tokens_per_step
        fractions.append((tokens - wt) / max(cfg.max_tokens - wt, 1))
    if cfg.max_minutes is not None:
        fractions.append(elapsed_s / (60.0 * cfg.max_minutes))
    return max(fractions)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
