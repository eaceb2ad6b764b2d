"""MultiMemoryLayer and its op: the mixture scan equals a per-token loop of the documented equations
(outputs, final state, gradients), the round-robin rule, the masked mix, the seed's stacks."""
from __future__ import annotations

import pytest
import torch

from newllm import NewLLMError, TransformerLM, create_model
from newllm.models.layers import InfiniLayer, MultiMemoryLayer, PythiaLayer
from newllm.models.ops.memory import init_memory, memory_scan
from newllm.models.ops.memory_mix import init_mixture, mixture_scan, segments_per_memory

ELU1 = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731


def naive_mixture(q, k, v, memory, norm, key_sum, segments, S, rho, delta, eps=1e-6):
    """Token by token, memory by memory: the module docstring of ops/memory_mix.py, written out.

    q: (B, H, Tq, D) are the last Tq positions of k, v: (B, H, T, D). Returns (out, memory, norm, key_sum)."""
    B, H, T, D = k.shape
    M, sc = memory.shape[1], D**-0.5
    mem = [memory[:, m].clone() for m in range(M)]
    z = [norm[:, m].clone() for m in range(M)]
    ksum = [key_sum[:, m].clone() for m in range(M)]
    written = {m: c for m, c in enumerate(segments_per_memory(segments, M))}
    outs, off = [], T - q.shape[2]
    n = segments
    for t in range(T):
        if t >= off:
            qt = q[:, :, t - off]  # (B, H, D)
            fq = ELU1(qt * sc)
            row = torch.zeros(B, H, D)
            live = [m for m in range(M) if written[m] > 0]
            if live:
                logits = torch.stack([rho.view(1, H) * (qt * ksum[m] / (written[m] * S)).sum(-1) * sc
                                      for m in live], 0)  # (L, B, H)
                w = logits.softmax(0)
                for j, m in enumerate(live):
                    r = torch.einsum("bhk,bhkv->bhv", fq, mem[m]) / ((fq * z[m]).sum(-1, keepdim=True) + eps)
                    row = row + w[j].unsqueeze(-1) * r
            outs.append(row)
        if (t + 1) % S == 0:  # segment complete: write it into memory n % M
            m = n % M
            seg = slice(t + 1 - S, t + 1)
            fk, vs = ELU1(k[:, :, seg] * sc), v[:, :, seg]
            if delta:
                vs = vs - (fk @ mem[m]) / ((fk @ z[m].unsqueeze(-1)) + eps)
            mem[m] = mem[m] + fk.transpose(-1, -2) @ vs
            z[m] = z[m] + fk.sum(-2)
            ksum[m] = ksum[m] + k[:, :, seg].sum(-2)
            written[m] += 1
            n += 1
    return torch.stack(outs, 2), torch.stack(mem, 1), torch.stack(z, 1), torch.stack(ksum, 1)


CASES = {  # B, H, T, Tq, D, S, M, segments already written, delta
    "B2-T23-S5-M3-delta": (2, 1, 23, 23, 8, 5, 3, 0, True),
    "B1-T17-S4-M2-linear-prefix": (1, 2, 17, 14, 6, 4, 2, 3, False),
    "B2-T9-S3-M4-delta-carried": (2, 2, 9, 7, 4, 3, 4, 5, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_mixture_scan_equals_per_token_loop(case):
    B, H, T, Tq, D, S, M, seg0, delta = CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64).float() for n in (Tq, T, T))
    state0 = init_mixture(B, M, H, D, D)
    # a non-empty starting memory in every slot (an all-zero M with z = 0 makes the delta rule's
    # gradient w.r.t. M scale like 1/eps: ill-conditioned in fp32 for any implementation); memories
    # with no segment written yet (c_m = 0) are still left out of the mix, whatever they hold
    live = torch.tensor([c > 0 for c in segments_per_memory(seg0, M)], dtype=torch.float32).view(1, M, 1, 1)
    state0 = state0._replace(memory=torch.randn(B, M, H, D, D, generator=g) * 0.1,
                             norm=torch.rand(B, M, H, D, generator=g) * 2 + 4,
                             key_sum=torch.randn(B, M, H, D, generator=g) * live,
                             segments=torch.tensor(seg0))
    rho = torch.rand(H, generator=g) + 0.5
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, state0.memory, state0.norm, state0.key_sum, rho)]
    q1, k1, v1, m1, z1, s1, r1 = leaves
    out, st = mixture_scan(q1, k1, v1, state0._replace(memory=m1, norm=z1, key_sum=s1), segment_length=S,
                           route_scale=r1, delta_rule=delta, write_partial=False)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, state0.memory, state0.norm, state0.key_sum, rho)]
    q2, k2, v2, m2, z2, s2, r2 = ref_leaves
    ref, rm, rz, rk = naive_mixture(q2, k2, v2, m2, z2, s2, seg0, S, r2, delta)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.memory, rm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.norm, rz, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.key_sum, rk, atol=1e-5, rtol=1e-5)
    assert int(st.segments) == seg0 + T // S
    w = [torch.randn(t.shape, generator=g) for t in (out, st.memory, st.norm, st.key_sum)]
    loss = lambda o, a, b, c: sum((x * y).sum() for x, y in zip((o, a, b, c), w))  # noqa: E731
    grads = torch.autograd.grad(loss(out, st.memory, st.norm, st.key_sum), leaves)
    ref_grads = torch.autograd.grad(loss(ref, rm, rz, rk), ref_leaves)
    for name, a, b in zip("q k v memory norm key_sum rho".split(), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_round_robin_memory_m_holds_every_mth_segment():
    """Memory m after n segments == one Infini memory written with segments m, m+M, m+2M, ..."""
    B, H, D, S, M, n = 2, 1, 8, 4, 3, 7
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n * S, D, generator=g) for _ in range(3))
    _, st = mixture_scan(q, k, v, init_mixture(B, M, H, D, D), segment_length=S, route_scale=torch.ones(H))
    for m in range(M):
        idx = torch.cat([torch.arange(s * S, (s + 1) * S) for s in range(m, n, M)])
        _, ref = memory_scan(q[:, :, idx], k[:, :, idx], v[:, :, idx], init_memory(B, H, D, D), segment_length=S)
        torch.testing.assert_close(st.memory[:, m], ref.memory[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.key_sum[:, m], k[:, :, idx].sum(-2), atol=1e-5, rtol=1e-5)


def test_one_written_memory_reads_like_infini_and_empty_reads_zero():
    """Only written memories take part in the mix: with one, the read is exactly its Infini read."""
    B, H, D, S = 1, 2, 6, 5
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, 2 * S, D, generator=g) for _ in range(3))
    out, _ = mixture_scan(q, k, v, init_mixture(B, 4, H, D, D), segment_length=S, route_scale=torch.ones(H))
    ref, _ = memory_scan(q, k, v, init_memory(B, H, D, D), segment_length=S)
    assert out[:, :, :S].abs().max() == 0  # segment 0: nothing written yet
    torch.testing.assert_close(out[:, :, S:], ref[:, :, S:], atol=1e-6, rtol=1e-6)


def tiny_layer(**kw):
    torch.manual_seed(0)
    return MultiMemoryLayer(32, 4, 64, **{"segment_length": 6, "num_memories": 3, **kw}).eval()


@pytest.mark.parametrize("cuts", [[5], [1, 2, 11, 12, 30], list(range(1, 37))], ids=["inside-seg", "ragged", "1-token"])
def test_layer_one_call_equals_any_split(cuts):
    layer = tiny_layer()
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, s_full = layer(x)
        state, outs = None, []
        for a, b in zip([0, *cuts], [*cuts, 37]):
            y, state = layer(x[:, a:b], state)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
    for a, b in zip(state, s_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert layer.tokens_absorbed(state) == 37 and int(state.segments) == 6


def test_memory_carries_across_segments_only_when_on():
    """Changing segment 0 changes outputs in segment 3 through the memory (local attention cannot
    reach across segments), and does not when the memory is switched off."""
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(4))
    x2 = x.clone()
    x2[:, :6] = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))
    for use_memory, changes in ((True, True), (False, False)):
        layer = tiny_layer(use_memory=use_memory)
        with torch.no_grad():
            d = (layer(x)[0] - layer(x2)[0])[:, 18:].abs().max()
        assert (d > 1e-4) == changes, (use_memory, float(d))


def test_gates_and_param_groups():
    layer = tiny_layer(gate_init=1.5, route_scale_init=2.0)
    torch.testing.assert_close(layer.gates()['memory'], torch.sigmoid(torch.full((4,), 1.5)))
    torch.testing.assert_close(layer.mixer.memory.route_log_scale.exp().detach(), torch.full((1,), 2.0))
    groups = layer.param_groups()["gates"]
    assert [id(p) for p in groups] == [id(layer.mixer.beta), id(layer.mixer.memory.route_log_scale)]
    assert MultiMemoryLayer.has_compressive_memory


def test_preset_options_and_bad_config():
    m = create_model("multi_memory", num_memories=8, vocab_size=97, hidden_size=32, num_attention_heads=4,
                     intermediate_size=64, num_hidden_layers=3)
    assert [l.layer_type for l in m.layers] == ["multi_memory", "pythia", "pythia"]
    assert m.layers[0].config.num_memories == 8 and m.layers[0].config.use_delta_rule
    assert m.layers[0].init_state(1).memory.shape == (1, 8, 1, 32, 32)
    with pytest.raises(NewLLMError, match="num_memories must be > 0"):
        MultiMemoryLayer(32, 4, 64, num_memories=0)
    with pytest.raises(NewLLMError, match=r"unknown key\(s\) \['num_memory_banks'\]"):
        MultiMemoryLayer(32, 4, 64, num_memory_banks=2)  # banks are InfiniLayer's; memories are num_memories


def test_seed_custom_stack_runs_as_written():
    """Seed 001's mixed stack, with our import paths and its exact arguments."""
    torch.manual_seed(0)
    layers = [
        MultiMemoryLayer(512, 8, 2048, num_memories=4),
        InfiniLayer(512, 8, 2048),
        *[PythiaLayer(512, 8, 2048) for _ in range(4)],
    ]
    model = TransformerLM(layers=layers).eval()
    assert [l.layer_type for l in model.layers] == ["multi_memory", "infini"] + ["pythia"] * 4
    ids = torch.randint(0, 50304, (1, 12))
    with torch.no_grad():
        out = model(ids, update_memory=True)
    assert out.logits.shape == (1, 12, 50304) and torch.isfinite(out.logits).all()
    assert model.get_memory_state().layer_types == ["multi_memory", "infini"] + ["pythia"] * 4
