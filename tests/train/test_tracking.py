"""Run tracking: progress lines when stderr is not a terminal, the optional wandb backend (a stand-in
module, and the real one offline when installed), its run id carried through checkpoints."""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from newllm.errors import NewLLMError
from newllm.train import Trainer
from newllm.train.checkpoint import find_checkpoint, load_trainer_state

N_TOKENS = 16 * 20 + 1


def progress_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("step ")]


def test_progress_is_one_line_every_log_every_steps_when_not_a_terminal(shakespeare, make_model, make_cfg, capsys):
    t = Trainer(make_cfg(progress=True, log_every=2, max_steps=6), make_model(0), shakespeare[1][:N_TOKENS])
    t.run(tensorboard=False)
    captured = capsys.readouterr()
    lines = progress_lines(captured.out)
    assert [line.split(" loss ")[0] for line in lines] == ["step 2/6 (33%)", "step 4/6 (67%)", "step 6/6 (100%)"]
    loss = [r["loss"] for r in t.metrics.records if r["kind"] == "train"][-1]
    assert f"loss {loss:.3f} " in lines[-1] and " tok/s " in lines[-1] and " elapsed 0:00:" in lines[-1]
    assert "\r" not in captured.err  # and no bar


def test_a_terminal_gets_the_bar_and_no_lines(shakespeare, make_model, make_cfg, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    Trainer(make_cfg(progress=True, log_every=2, max_steps=4), make_model(0), shakespeare[1][:N_TOKENS]).run(
        tensorboard=False)
    captured = capsys.readouterr()
    assert progress_lines(captured.out) == [] and "4/4" in captured.err


def test_progress_false_prints_nothing(shakespeare, make_model, make_cfg, capsys):
    Trainer(make_cfg(progress=False, log_every=1, max_steps=2), make_model(0), shakespeare[1][:N_TOKENS]).run(
        tensorboard=False)
    captured = capsys.readouterr()
    assert progress_lines(captured.out) == [] and captured.err == ""


# ---------------------------------------------------------------------- wandb
class FakeRun:
    def __init__(self, run_id):
        self.id, self.logged, self.finished = run_id, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module recording init() calls; a new run gets id new-N."""
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.inits, mod.runs = [], []

    def init(**kw):
        mod.inits.append(kw)
        mod.runs.append(FakeRun(kw["id"] or f"new-{len(mod.inits)}"))
        return mod.runs[-1]

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_wandb_run_id_is_kept_in_the_checkpoint_and_a_resume_continues_that_run(shakespeare, make_model, make_cfg,
                                                                                fake_wandb):
    cfg = make_cfg("w", wandb={"enabled": True, "project": "proj", "tags": ["a"]}, eval={"every": 0})
    first = Trainer(cfg, make_model(0), shakespeare[1][:N_TOKENS])
    first.run(stop_after=2, tensorboard=False)
    first.metrics.close()
    kw = fake_wandb.inits[0]
    assert (kw["id"], kw["resume"], kw["project"], kw["name"], kw["tags"]) == (None, None, "proj", "w", ["a"])
    assert kw["dir"] == str(first.run_dir) and kw["config"]["max_steps"] == 6
    assert load_trainer_state(find_checkpoint(cfg.run_dir))["tracking"] == {"wandb_run_id": "new-1"}
    run = fake_wandb.runs[0]
    assert [s for s, _ in run.logged] == [1, 2] and run.finished
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(run.logged[0][1])

    second = Trainer(cfg, make_model(1), shakespeare[1][:N_TOKENS])
    second.load(find_checkpoint(cfg.run_dir))
    second.run(tensorboard=False)
    second.metrics.log("final", second.step, split="test", token_ppl=12.5)
    second.metrics.close()
    assert (fake_wandb.inits[1]["id"], fake_wandb.inits[1]["resume"]) == ("new-1", "allow")
    resumed = fake_wandb.runs[1]
    assert [s for s, _ in resumed.logged] == [3, 4, 5, 6, 6]
    assert resumed.logged[-1] == (6, {"final/test/token_ppl": 12.5})  # a record with a split: KIND/SPLIT/KEY
    assert load_trainer_state(find_checkpoint(cfg.run_dir))["tracking"] == {"wandb_run_id": "new-1"}


def test_wandb_not_installed_is_a_one_line_error_before_any_work(shakespeare, make_model, make_cfg, monkeypatch):
    from newllm.train.metrics import require_backends

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = make_cfg(wandb={"enabled": True})
    with pytest.raises(NewLLMError, match=r"wandb package is not installed \(pip install 'newllm\[wandb\]'\)"):
        require_backends(cfg)
    require_backends(make_cfg())  # not enabled: wandb is never looked for
    t = Trainer(cfg, make_model(0), shakespeare[1][:N_TOKENS])
    with pytest.raises(NewLLMError, match="wandb package is not installed"):
        t.run(tensorboard=False)


@pytest.mark.parametrize("fields, message", [
    ({"mode": "cloud"}, r"wandb: mode must be one of \('online', 'offline', 'disabled'\) or null, got 'cloud'"),
    ({"project": " "}, "wandb: project must be a non-empty name"),
    ({"tags": "a"}, r"wandb\.tags must be a list"),
    ({"enabled": "yes"}, r"wandb\.enabled must be true or false"),
])
def test_wandb_section_is_checked(make_cfg, fields, message):
    with pytest.raises(NewLLMError, match=message):
        make_cfg(wandb=fields)


def test_real_wandb_offline_resume_continues_the_same_run(shakespeare, make_model, make_cfg, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg("real", max_steps=3, wandb={"enabled": True, "mode": "offline"})
    first = Trainer(cfg, make_model(0), shakespeare[1][:N_TOKENS])
    first.run(stop_after=1, tensorboard=False)
    first.metrics.close()
    run_id = first.wandb_run_id
    assert run_id and load_trainer_state(find_checkpoint(cfg.run_dir))["tracking"]["wandb_run_id"] == run_id
    second = Trainer(cfg, make_model(0), shakespeare[1][:N_TOKENS])
    second.load(find_checkpoint(cfg.run_dir))
    second.run(tensorboard=False)
    second.metrics.close()
    assert second.wandb_run_id == run_id
    runs = sorted(p.name for p in (first.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith("-" + run_id) for name in runs)  # two sessions, one W&B run
