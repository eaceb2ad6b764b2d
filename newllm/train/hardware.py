"""What the hardware can do, for `amp: auto`: bf16 autocast where the device has native bf16.

Native bf16 means bf16 arithmetic in hardware: a CUDA device that reports bf16 support, or a CPU
whose flags include `amx_bf16` (Intel AMX tiles) or `avx512_bf16` (the AVX-512 BF16 dot products,
Intel Cooper Lake and later, AMD Zen 4 and later). Elsewhere bf16 is emulated through fp32 and is
slower than fp32, so `auto` picks fp32 ("none"). Autocast keeps what must stay fp32 in fp32:
the compressive memories' arithmetic is fp32 whatever the input (`newllm.models.ops.memory`),
normalisations run in fp32 (RMSNorm computes in fp32; autocast runs layer_norm in fp32), and the
loss is computed from fp32 logits (`lm_loss`).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether `device` computes bf16 natively (module doc)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(f in (cpu_flags() if flags is None else flags) for f in BF16_CPU_FLAGS)
    return False


def resolve_amp(amp: str, device: torch.device, flags: frozenset[str] | None = None) -> str:
    """The autocast mode a run uses: `amp` as given, or for "auto" "bf16" on a device with native bf16
    and "none" (fp32) elsewhere."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device, flags) else "none"


def amp_words(asked: str, used: str) -> str:
    """How a run computes, for its first line: "fp32", "bf16 autocast", "amp auto: bf16 autocast (native bf16)"."""
    words = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler"}[used]
    if asked != "auto":
        return words
    return f"amp auto: {words} ({'native bf16' if used == 'bf16' else 'no native bf16 on this device'})"
