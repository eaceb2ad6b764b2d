"""amp: auto (issue 16): bf16 autocast where the device has native bf16, fp32 elsewhere; the bf16
loss curve follows fp32's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from newllm.errors import NewLLMError
from newllm.train.hardware import amp_words, native_bf16, resolve_amp


@pytest.mark.parametrize("flags,expected", [
    (frozenset({"avx2", "avx512f", "avx512_bf16"}), "bf16"),  # AMD Zen 4, Intel Cooper Lake
    (frozenset({"avx512f", "amx_bf16", "amx_tile"}), "bf16"),  # Intel Sapphire Rapids (AMX)
    (frozenset({"avx2", "avx512f"}), "none"),  # no bf16 arithmetic: bf16 would be emulated, slower than fp32
    (frozenset(), "none"),
])
def test_auto_picks_bf16_only_on_native_bf16_cpus(flags, expected):
    assert resolve_amp("auto", torch.device("cpu"), flags) == expected
    for explicit in ("none", "bf16", "fp16"):
        assert resolve_amp(explicit, torch.device("cpu"), flags) == explicit  # an explicit choice is kept


def test_the_trainer_resolves_auto_for_this_machine(make_model, make_cfg, shakespeare, capsys):
    from newllm.train import Trainer

    trainer = Trainer(make_cfg(amp="auto"), make_model(), shakespeare[1])
    assert trainer.amp == ("bf16" if native_bf16(torch.device("cpu")) else "none")
    assert amp_words("auto", "none") == "amp auto: fp32 (no native bf16 on this device)"
    assert amp_words("auto", "bf16") == "amp auto: bf16 autocast (native bf16)"


def test_unknown_amp_is_refused(make_cfg):
    with pytest.raises(NewLLMError, match="amp must be one of .*'auto'"):
        make_cfg(amp="bf32")


def test_bf16_loss_curve_follows_fp32_over_200_steps(make_model, make_cfg, shakespeare):
    """200 steps of the tiny model on real text, fp32 against bf16 autocast from the same weights and
    batches. Tolerance: every 20-step mean of the bf16 losses within 0.05 nats of fp32's (bf16 keeps 8
    mantissa bits: ~0.4% per rounding), and the final 20-step means within 2%."""
    from newllm.train import Trainer

    curves = {}
    for amp in ("none", "bf16"):
        cfg = make_cfg(name=amp, amp=amp, max_steps=200, grad_accum=1, warmup_steps=10, lr=3e-3, min_lr=3e-4)
        trainer = Trainer(cfg, make_model(), shakespeare[1])
        curves[amp] = np.array([trainer.train_step().loss for _ in range(200)])
    fp32, bf16 = curves["none"].reshape(10, 20).mean(1), curves["bf16"].reshape(10, 20).mean(1)
    assert fp32[-1] < fp32[0] - 1.0  # it learned: the comparison is not between two flat lines
    assert np.abs(bf16 - fp32).max() < 0.05, (fp32, bf16)
    assert abs(bf16[-1] - fp32[-1]) / fp32[-1] < 0.02
