"""metrics.jsonl on resume, TensorBoard present or missing, the loss PNG."""
from __future__ import annotations

import json
import sys

from newllm.train.metrics import MetricsLog


def write_run(run_dir, steps, **kw):
    m = MetricsLog(run_dir, **kw)
    for s in steps:
        m.log("train", s, loss=5.0 - 0.1 * s)
        if s % 2 == 0:
            m.log("eval", s, split="valid", token_ppl=100.0 - s)
    return m


def test_resume_drops_records_after_the_checkpoint_step(tmp_path):
    write_run(tmp_path, range(1, 7), tensorboard=False).close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "final", "step": 3, "split": "valid", "token_ppl": 9.0}) + "\n")
    m = MetricsLog(tmp_path, resume_step=4, tensorboard=False)  # the checkpoint was taken at step 4
    m.log("train", 5, loss=1.0)
    m.close()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in recs] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3),
                                                      ("train", 4), ("eval", 4), ("train", 5)]


def test_png_has_train_and_valid_curves(tmp_path):
    m = write_run(tmp_path, range(1, 5), tensorboard=False)
    m.plot()
    m.close()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".loss.tmp*"))  # written atomically


def test_tensorboard_events_written(tmp_path):
    write_run(tmp_path, range(1, 3), tensorboard=True).close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_missing_tensorboard_is_a_note_not_a_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    m = write_run(tmp_path, range(1, 3), tensorboard=True)
    m.close()
    assert "note: TensorBoard events not written" in capsys.readouterr().out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "tensorboard").exists()
