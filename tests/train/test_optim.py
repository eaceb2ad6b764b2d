"""Learning-rate schedule shape and AdamW parameter groups (memory gates get their own group)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from newllm.errors import NewLLMError
from newllm.train import Trainer
from newllm.train.optim import budget_progress, build_param_groups, lr_factor


def test_schedule_warmup_then_cosine_to_min(make_cfg):
    cfg = make_cfg(warmup_steps=10, max_steps=110, lr=1e-3, min_lr=1e-4)
    r = cfg.min_lr / cfg.lr
    f = [lr_factor(s, budget_progress(cfg, s, s * cfg.tokens_per_step, 0.0), cfg.warmup_steps, r)
         for s in range(1, 111)]
    assert f[:10] == pytest.approx([s / 10 for s in range(1, 11)], abs=1e-12)  # linear warmup to 1
    assert f[59] == pytest.approx((1 + r) / 2, abs=1e-12)  # step 60: half way through the cosine
    assert f[-1] == pytest.approx(r, abs=1e-12)  # ends at min_lr / lr
    assert all(a > b for a, b in zip(f[10:], f[11:]))  # strictly decreasing after warmup
    # cosine shape: f(p) = r + (1 - r) (1 + cos(pi p)) / 2 at p = 1/4
    assert f[34] == pytest.approx(r + (1 - r) * (1 + math.cos(math.pi / 4)) / 2, abs=1e-12)


def test_token_and_time_budgets_drive_the_same_cosine(make_cfg):
    by_steps = make_cfg(warmup_steps=0, max_steps=100)
    by_tokens = make_cfg(warmup_steps=0, max_steps=None, max_tokens=100 * by_steps.tokens_per_step)
    by_time = make_cfg(warmup_steps=0, max_steps=None, max_minutes=10.0)
    assert budget_progress(by_steps, 25, 0, 0.0) == pytest.approx(0.25, abs=1e-12)
    assert budget_progress(by_tokens, 0, 25 * by_steps.tokens_per_step, 0.0) == pytest.approx(0.25, abs=1e-12)
    assert budget_progress(by_time, 0, 0, 150.0) == pytest.approx(0.25, abs=1e-12)
    both = make_cfg(warmup_steps=0, max_steps=100, max_minutes=10.0)  # whichever budget is nearer its end
    assert budget_progress(both, 25, 0, 300.0) == pytest.approx(0.5, abs=1e-12)


def test_trainer_applies_the_schedule(shakespeare, make_model, make_cfg):
    cfg = make_cfg(warmup_steps=2, max_steps=5, lr=1e-3, min_lr=1e-4)
    t = Trainer(cfg, make_model(0), shakespeare[1][:2000])
    t.run(tensorboard=False)
    logged = [r["lr"] for r in t.metrics.records if r["kind"] == "train"]
    expect = [1e-3 * lr_factor(s, (s - 2) / 3, 2, 0.1) for s in range(1, 6)]
    assert logged == pytest.approx(expect, rel=1e-12)
    assert [g["lr"] for g in t.optimizer.param_groups] == pytest.approx([1e-4] * len(t.optimizer.param_groups))


def infini_model(make_model):
    return make_model(0, preset="infini", segment_length=8)


def test_param_groups_split_decay_and_gates(make_model):
    model = infini_model(make_model)
    groups = {g["name"]: g for g in build_param_groups(model, 1e-3, 0.1, {"gates": {"lr": 5e-2}})}
    assert set(groups) == {"decay", "no_decay", "gates"}
    beta = model.layers[0].mixer.beta
    assert [id(p) for p in groups["gates"]["params"]] == [id(beta)]
    assert groups["gates"]["lr"] == 5e-2 and groups["gates"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    # each trainable parameter in exactly one group
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    assert id(model.embed.weight) in ids["no_decay"] and id(model.lm_head.weight) in ids["decay"]
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert {id(m.weight), id(m.bias)} <= ids["no_decay"]
        if isinstance(m, nn.Linear):
            assert id(m.weight) in ids["decay"]
            if m.bias is not None:
                assert id(m.bias) in ids["no_decay"]


def test_requested_group_without_settings_gets_base_lr_and_no_decay(make_model):
    groups = {g["name"]: g for g in build_param_groups(infini_model(make_model), 1e-3, 0.1, {})}
    assert groups["gates"]["lr"] == 1e-3 and groups["gates"]["weight_decay"] == 0.0


def test_unknown_group_in_config_is_an_error(make_model):
    with pytest.raises(NewLLMError, match=r"param_groups: \['gatez'\] requested by no layer"):
        build_param_groups(infini_model(make_model), 1e-3, 0.1, {"gatez": {"lr": 1.0}})


def test_gate_group_trains_with_its_own_lr_and_gates_are_logged(shakespeare, make_model, make_cfg):
    cfg = make_cfg(warmup_steps=0, max_steps=2, lr=1e-3, min_lr=1e-3, weight_decay=0.5,
                   param_groups={"gates": {"lr": 0.1}})
    model = infini_model(make_model)
    beta0 = model.layers[0].mixer.beta.detach().clone()
    t = Trainer(cfg, model, shakespeare[1][:2000])
    t.run(tensorboard=False)
    by_name = {g["name"]: g for g in t.optimizer.param_groups}
    assert by_name["gates"]["lr"] == pytest.approx(0.1, rel=1e-12)
    assert by_name["decay"]["lr"] == pytest.approx(1e-3, rel=1e-12)
    # Adam's first steps move each weight by about lr: beta moves ~0.1 per step, not ~1e-3
    moved = (model.layers[0].mixer.beta.detach() - beta0).abs()
    assert bool((moved > 0.05).all()) and bool((moved < 0.25).all())
    rec = [r for r in t.metrics.records if r["kind"] == "train"][-1]
    g = torch.sigmoid(model.layers[0].mixer.beta.detach())
    assert rec["gate.L0.memory.mean"] == pytest.approx(float(g.mean()), abs=1e-6)
    assert rec["gate.L0.memory.min"] == pytest.approx(float(g.min()), abs=1e-6)
    assert rec["gate.L0.memory.max"] == pytest.approx(float(g.max()), abs=1e-6)
    assert not any(k.startswith("gate.L1.") for k in rec)  # Pythia layers have no gates
