"""Stop-and-resume equals an uninterrupted run; bad checkpoints fail with one line naming the file."""
from __future__ import annotations

import pytest
import torch

from newllm.errors import NewLLMError
from newllm.train import Trainer
from newllm.train.checkpoint import find_checkpoint

# 20 windows of 17 tokens: an epoch is 5 micro-batches of 4, so 6 steps x grad_accum 2 = 12
# micro-batches cross two epoch boundaries, and the stop at step 3 falls inside epoch 1.
N_TOKENS = 16 * 20 + 1


def losses(trainer):
    return [r["loss"] for r in trainer.metrics.records if r["kind"] == "train"]


@pytest.mark.parametrize("stop_at", [1, 3, 5], ids=lambda k: f"stop{k}")
def test_resume_matches_uninterrupted(shakespeare, make_model, make_cfg, stop_at):
    ids = shakespeare[1][:N_TOKENS]
    full = Trainer(make_cfg("full"), make_model(0), ids)
    full.run(tensorboard=False)

    part = make_cfg("part")
    first = Trainer(part, make_model(0), ids)
    first.run(stop_after=stop_at, tensorboard=False)
    assert first.step == stop_at and not first.done()
    first.metrics.close()
    # a differently initialised model and fresh RNG: everything must come from the checkpoint
    torch.manual_seed(123)
    second = Trainer(part, make_model(seed=7), ids)
    second.load(find_checkpoint(part.run_dir))
    assert (second.step, second.epoch) == (stop_at, first.epoch)
    second.run(tensorboard=False)

    assert second.step == full.step == 6
    assert losses(second) == losses(full)  # per-step losses, exactly (CPU, fp32, same order)
    assert len(losses(full)) == 6 and losses(full)[-1] < losses(full)[0]
    for (name, p), q in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), name
    lrs = [[r["lr"] for r in t.metrics.records if r["kind"] == "train"] for t in (full, second)]
    assert lrs[0] == lrs[1]


def test_data_order_is_a_function_of_seed_and_epoch(shakespeare, make_model, make_cfg):
    ids = shakespeare[1][:N_TOKENS]
    a = Trainer(make_cfg("a"), make_model(0), ids)
    b = Trainer(make_cfg("b"), make_model(1), ids)
    c = Trainer(make_cfg("c", seed=1), make_model(0), ids)
    torch.manual_seed(99)  # the global RNG must not matter
    batches = [[t.next_batch() for _ in range(10)] for t in (a, b, c)]
    assert all(torch.equal(x, y) for x, y in zip(batches[0], batches[1]))
    assert not all(torch.equal(x, y) for x, y in zip(batches[0], batches[2]))
    # one epoch (5 batches of 4 out of 20 windows) visits every window exactly once
    first_epoch = torch.cat(batches[0][:5])

    assert len(first_epoch) == 20 and a.epoch == 1
    windows = {tuple(a.windows[i].tolist()) for i in range(20)}
    assert {tuple(w.tolist()) for w in first_epoch} == windows



def test_nonfinite_loss_stops_naming_the_step(shakespeare, make_model, make_cfg):
    from newllm.train import TrainingDiverged

    model = make_model(0)
    with torch.no_grad():
        model.embed.weight[:] = float("nan")
    t = Trainer(make_cfg(), model, shakespeare[1][:N_TOKENS])
    with pytest.raises(TrainingDiverged, match=r"non-finite loss nan at step 1 "):
        t.run(tensorboard=False)


def test_nonfinite_skip_counts_then_stops(shakespeare, make_model, make_cfg):
    from newllm.train import TrainingDiverged

    model = make_model(0)
    with torch.no_grad():
        model.embed.weight[:] = float("nan")
    t = Trainer(make_cfg(on_nonfinite="skip", max_nonfinite_skips=2), model, shakespeare[1][:N_TOKENS])
    with pytest.raises(TrainingDiverged, match=r"step 3: 3 steps skipped"):
        t.run(tensorboard=False)
    assert [r["skipped"] for r in t.metrics.records] == [1, 2]


@pytest.fixture
def saved_run(shakespeare, make_model, make_cfg):
    cfg = make_cfg("saved", max_steps=2)
    t = Trainer(cfg, make_model(0), shakespeare[1][:N_TOKENS])
    t.run(tensorboard=False)
    t.metrics.close()
    return cfg, find_checkpoint(cfg.run_dir)


def corrupt_garbage(folder):
    (folder / "trainer.pt").write_bytes(b"this is not a checkpoint at all\n" * 10)
    return folder / "trainer.pt"


def corrupt_truncated(folder):
    data = (folder / "trainer.pt").read_bytes()
    (folder / "trainer.pt").write_bytes(data[: len(data) // 2])
    return folder / "trainer.pt"


def corrupt_foreign(folder):
    torch.save({"state_dict": {"w": torch.zeros(3)}}, folder / "trainer.pt")  # someone else's torch file
    return folder / "trainer.pt"


def corrupt_weights(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return folder / "model.safetensors"


@pytest.mark.parametrize("corrupt", [corrupt_garbage, corrupt_truncated, corrupt_foreign, corrupt_weights],
                         ids=lambda f: f.__name__.removeprefix("corrupt_"))
def test_bad_checkpoint_is_one_line_error_naming_the_file(saved_run, shakespeare, make_model, corrupt):
    cfg, folder = saved_run
    bad = corrupt(folder)
    t = Trainer(cfg, make_model(0), shakespeare[1][:N_TOKENS])
    with pytest.raises(NewLLMError) as e:
        t.load(find_checkpoint(cfg.run_dir))
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg


def test_checkpoint_of_another_model_is_refused(saved_run, shakespeare, make_model):
    cfg, folder = saved_run
    t = Trainer(cfg, make_model(0, hidden_size=64), shakespeare[1][:N_TOKENS])
    with pytest.raises(NewLLMError, match=r"trainer\.pt: checkpoint is for a different model"):
        t.load(folder)


def test_resume_path_that_is_no_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NewLLMError, match="notes.txt: not a training checkpoint"):
        find_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(NewLLMError, match="neither a run folder"):
        find_checkpoint(tmp_path)
    with pytest.raises(NewLLMError, match="no such run folder"):
        find_checkpoint(tmp_path / "missing")


def test_checkpoints_are_pruned_and_latest_is_complete(shakespeare, make_model, make_cfg):
    cfg = make_cfg("ck", checkpoint_every=2, keep_checkpoints=2)
    t = Trainer(cfg, make_model(0), shakespeare[1][:N_TOKENS])
    t.run(tensorboard=False)
    root = t.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004", "step-0000006"]
    assert find_checkpoint(t.run_dir) == root / "step-0000006"
    from newllm.checkpoints.native import load_model

    loaded = load_model(root / "step-0000006")  # every checkpoint is a loadable model folder
    for p, q in zip(loaded.parameters(), t.model.parameters()):
        assert torch.equal(p, q)
