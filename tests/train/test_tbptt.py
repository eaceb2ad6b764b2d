"""Truncated BPTT (`carry_windows`): the state carried across consecutive windows, gradients through
exactly the k segments of a window, the chunk order, resume."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from newllm.errors import NewLLMError
from newllm.train.checkpoint import find_checkpoint
from newllm.train.tbptt import StreamTrainer, trainer_class

S, K = 4, 3  # segments of 4 tokens, k = 3 segments per training window


def memory_model(make_model, seed=0):
    # memory everywhere: past its segment a token reaches the loss only through the memory writes
    return make_model(seed, preset="infini_all", segment_length=S, initializer_range=0.2)


def test_gradients_reach_k_segments_back_and_not_k_plus_1(shakespeare, make_model, make_cfg):
    cfg = make_cfg("g", seq_len=K * S, batch_size=2, grad_accum=1, carry_windows=2)
    model = memory_model(make_model)
    trainer = StreamTrainer(cfg, model, shakespeare[1][:2000])
    embeds = []

    def keep(module, inputs, out):  # the embeddings of every forward, with their gradients kept
        out.retain_grad()
        embeds.append(out)

    hook = model.embed.register_forward_hook(keep)
    x0 = trainer.next_batch()
    assert trainer.sampler.last_window == 0
    trainer.batch_loss(x0, 0)
    x1 = trainer.next_batch()
    assert trainer.sampler.last_window == 1 and torch.equal(x1[:, 0], x0[:, -1])  # the next window of the same text
    carried = trainer.carried[0]
    assert all(not t.requires_grad for s in carried for t in s)  # detached: the truncation

    def last_segment_loss(state):
        logits = model(x1[:, :-1], state=state).logits
        return F.cross_entropy(logits[:, -S:].flatten(0, 1), x1[:, -S:].flatten())

    last_segment_loss(carried).backward()
    e0, e1 = embeds[0], embeds[-1]
    per_segment = e1.grad.abs().sum((0, 2)).view(K, S).sum(1)
    assert (per_segment > 0).all(), per_segment  # the window's k segments: k - 1 of them only through memory writes
    assert e0.grad is None or e0.grad.abs().max() == 0  # the segment before the window (k + 1 back): nothing

    # ... though that earlier segment does reach the loss (forward, through the carried memory), and
    # without the truncation its gradient would flow
    embeds.clear()
    model.zero_grad()
    out0 = model(x0[:, :-1])
    last_segment_loss(out0.state).backward()
    assert embeds[0].grad[:, -S:].abs().max() > 0
    hook.remove()


def test_chunks_are_read_window_by_window(shakespeare, make_model, make_cfg):
    tokens = torch.as_tensor(shakespeare[1][:1000]).long()
    cfg = make_cfg("order", seq_len=8, batch_size=2, grad_accum=2, carry_windows=3)
    trainer = StreamTrainer(cfg, make_model(0), tokens)
    sampler, chunk = trainer.sampler, 3 * 8
    seen = {}
    for i in range(2 * 3 * 2 * 2):  # two blocks of 3 steps x 2 micro-batches, twice around
        x = sampler.next_batch()
        w, m = sampler.last_window, sampler.last_micro
        assert (w, m) == divmod(i % 6, 2)
        for row, c in zip(x, sampler.last_ids):
            assert torch.equal(row, tokens[c * chunk + 8 * w: c * chunk + 8 * w + 9])
            seen.setdefault(c, []).append(w)
    assert all(ws[:3] == [0, 1, 2] for ws in seen.values())
    assert trainer_class(cfg) is StreamTrainer and trainer_class(make_cfg("x")).__name__ == "Trainer"


def test_resume_mid_chunk_matches_uninterrupted(shakespeare, make_model, make_cfg):
    ids = shakespeare[1][:3000]
    fields = dict(seq_len=K * S, batch_size=2, grad_accum=2, carry_windows=2, max_steps=4)
    full = StreamTrainer(make_cfg("full", **fields), memory_model(make_model), ids)
    full.run(tensorboard=False)
    part = make_cfg("part", **fields)
    first = StreamTrainer(part, memory_model(make_model), ids)
    first.run(stop_after=3, tensorboard=False)  # step 3: the first window of a chunk read, its state carried
    first.metrics.close()
    torch.manual_seed(5)
    second = StreamTrainer(part, memory_model(make_model, seed=9), ids)
    second.load(find_checkpoint(part.run_dir))
    second.run(tensorboard=False)
    got = [r["loss"] for r in second.metrics.records if r["kind"] == "train"]
    want = [r["loss"] for r in full.metrics.records if r["kind"] == "train"]
    assert got == want and len(want) == 4
    for (name, p), q in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), name


def test_bad_settings_are_one_line(make_cfg, shakespeare, make_model):
    with pytest.raises(NewLLMError, match="carry_windows must be > 0"):
        make_cfg("a", carry_windows=0)
    with pytest.raises(NewLLMError, match="carry_windows=2 .* needs mode parallel"):
        make_cfg("b", carry_windows=2, mode="lct")
    with pytest.raises(NewLLMError, match="chunks of carry_windows x seq_len"):
        StreamTrainer(make_cfg("c", carry_windows=50, seq_len=16), make_model(0), shakespeare[1][:1000])
