"""LoRA through PEFT on a newllm model: `add_lora` injects PEFT's LoRA layers into the named modules
(in place, the model stays a `TransformerLM`), `merge_lora` folds them back into plain `nn.Linear`
weights (PEFT's own merge), so that the merged model saves and loads like any other.

    add_lora(model, LoRASpec(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ... train: only the lora_A / lora_B matrices require grad (PEFT freezes the rest) ...
    merge_lora(model)   # W <- W + (alpha / r) B A; the LoRA modules are gone

Module names are Hugging Face's (`self_attn.q_proj`, `attention.query_key_value`, `mlp.gate_proj`, ...),
so the LoLCATs recipe's target list applies as written. A target that matches no module is an
error naming it.
"""
from __future__ import annotations

import torch
from torch import nn

from newllm.errors import NewLLMError


def _require_peft():
    try:
        import peft
    except ImportError:
        raise NewLLMError("LoRA needs PEFT: pip install 'newllm[retrofit]' (or pip install peft)") from None
    return peft


def add_lora(model: nn.Module, spec, adapter_name: str = "default") -> nn.Module:
    """Inject LoRA (PEFT) into `model`'s modules whose name ends with one of `spec.target_modules`."""
    peft = _require_peft()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in spec.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise NewLLMError(f"lora.target_modules {missing} match no linear module of this model "
                          f"(e.g. {sorted({n.rsplit('.', 1)[-1] for n in names})})")
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=list(spec.target_modules), bias="none")
    return peft.inject_adapter_in_model(config, model, adapter_name=adapter_name)


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every PEFT LoRA layer into its base weight and put the base `nn.Linear` back in its place."""
    for name, module in lora_modules(model):
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = module.get_base_layer()
        for p in base.parameters():
            p.requires_grad_(True)
        setattr(parent, child, base)
    return model
