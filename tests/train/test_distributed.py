"""Training in 2 gloo processes on the CPU (torch.multiprocessing spawn, and once through torchrun):
equal parameters on every rank, 2 processes = 1 process with the same global batch, kill + resume =
uninterrupted, FSDP2 = DDP, the time budget and the non-finite skip decided across ranks.

Tolerances (fp32). Two ranks average their gradients with gloo's all-reduce, a different summation
order than one process's mean over the whole batch, so 2 processes equal 1 process to rounding, not
bit for bit: per-step losses within 1e-6 relative, parameters within 1e-5 absolute after 6 AdamW
steps at lr 3e-3 (AdamW divides each gradient component by its own RMS, so a last-bit difference in
a near-zero component moves that parameter by up to ~1e-3 of a step; measured here: losses 9e-8,
parameters 3.3e-6). FSDP2 (reduce-scatter of shards) against DDP: parameters within 2e-6 (measured
2e-7). Runs of the same kind on the same ranks are deterministic: ranks hold bit-equal parameters,
and a killed and resumed run equals the uninterrupted one bit for bit.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from newllm.errors import NewLLMError
from tests.train.conftest import TINY_MODEL
from tests.train.dist_worker import free_port, launch, make_model

# 20 windows of 17 tokens: an epoch is 5 micro-batches of 4, so 6 steps x grad_accum 2 cross two epoch
# boundaries, and the kill at step 3 falls inside epoch 1
N_TOKENS = 16 * 20 + 1
LOSS_RTOL, PARAM_ATOL, FSDP_ATOL = 1e-6, 1e-5, 2e-6
ROOT = Path(__file__).resolve().parents[2]


def base_cfg(run_dir, **fields):
    return {**dict(run_dir=str(run_dir), device="cpu", seq_len=16, batch_size=4, grad_accum=2, warmup_steps=2,
                   max_steps=6, lr=3e-3, min_lr=3e-4, log_every=1, checkpoint_every=0, progress=False,
                   eval={"every": 0}, data={"tokenizer": "unused.json"}), **fields}


STREAM = dict(preset="infini_all", segment_length=4)  # truncated BPTT: the state carried across windows
RUNS = {  # name: (fields, stop_at, model, fields changed on resume)
    "ddp": ({}, None, TINY_MODEL, {}),
    "ddp_killed": ({}, 3, TINY_MODEL, {}),
    "fsdp": ({"distributed": "fsdp"}, None, TINY_MODEL, {}),
    "fsdp_killed": ({"distributed": "fsdp"}, 3, TINY_MODEL, {}),
    "ddp_then_fsdp": ({}, 3, TINY_MODEL, {"distributed": "fsdp"}),  # DCP reshards a DDP checkpoint for FSDP
    "stream": ({"carry_windows": 2, "seq_len": 8}, None, {**TINY_MODEL, **STREAM}, {}),
    "stream_killed": ({"carry_windows": 2, "seq_len": 8}, 3, {**TINY_MODEL, **STREAM}, {}),
}


@pytest.fixture(scope="module")
def out(tmp_path_factory, shakespeare):
    """Every run of RUNS in 2 processes (one launch), results in OUT."""
    tok, ids = shakespeare
    out = tmp_path_factory.mktemp("dist")
    runs = [(name, base_cfg(out / name, **fields), stop, model, again)
            for name, (fields, stop, model, again) in RUNS.items()]
    launch("train_runs", 2, str(out), ids[:N_TOKENS], tok.vocab_size, runs)
    return out


def result(out, name, rank=0):
    return load_file(str(out / f"{name}-rank{rank}.safetensors")), json.loads((out / f"{name}-rank{rank}.json").read_text())


def single_process(shakespeare, tmp_path, name):
    from newllm.train import TrainConfig
    from newllm.train.tbptt import trainer_class

    tok, ids = shakespeare
    fields, _, model_kw, _ = RUNS[name]
    cfg = TrainConfig.from_dict(base_cfg(tmp_path / name, **fields))
    t = trainer_class(cfg)(cfg, make_model(tok.vocab_size, model_kw), ids[:N_TOKENS])
    t.run(tensorboard=False)
    return t, [r["loss"] for r in t.metrics.records if r["kind"] == "train"]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "stream"])
def test_parameters_are_equal_on_all_ranks(out, name):
    (p0, info0), (p1, info1) = result(out, name, 0), result(out, name, 1)
    assert info0["step"] == info1["step"] == 6 and len(info0["losses"]) == 6
    assert info0["losses"] == info1["losses"]  # the logged loss is the ranks' mean
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k


@pytest.mark.parametrize("name", ["ddp", "stream"])
def test_two_processes_equal_one_process_with_the_same_global_batch(out, shakespeare, tmp_path, name):
    t, losses = single_process(shakespeare, tmp_path, name)
    params, info = result(out, name)
    assert (info["epoch"], info["index"]) == (t.epoch, t.index)  # the same data position
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(info["losses"]), torch.tensor(losses), rtol=LOSS_RTOL, atol=0)
    for k, p in t.model.named_parameters():
        torch.testing.assert_close(params[k], p.detach(), rtol=0, atol=PARAM_ATOL, msg=k)
    # the tolerance is far below what training moved (a 2-process run that read other rows would fail)
    initial = make_model(shakespeare[0].vocab_size, RUNS[name][2]).state_dict()
    assert max(float((params[k] - initial[k]).abs().max()) for k in params) > 100 * PARAM_ATOL


def test_fsdp_trains_as_ddp_does(out):
    ddp, fsdp = result(out, "ddp")[0], result(out, "fsdp")[0]
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=FSDP_ATOL, msg=k)
    assert result(out, "fsdp")[1]["losses"] == pytest.approx(result(out, "ddp")[1]["losses"], rel=LOSS_RTOL)


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "stream"])
def test_killed_and_resumed_run_equals_uninterrupted(out, kind):
    full, full_info = result(out, kind)
    for rank in (0, 1):
        resumed, info = result(out, f"{kind}_killed", rank)
        assert info["first"] == full_info["losses"][:3]  # killed after step 3 ...
        assert info["step"] == 6 and info["losses"][-3:] == full_info["losses"][-3:]  # ... resumed to the same end
        for k in full:
            assert torch.equal(resumed[k], full[k]), (rank, k)
    # rank 0 read the metrics of the first part back: one record per step, as in one run
    records = [json.loads(line) for line in (out / f"{kind}_killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_ddp_checkpoint_resumes_under_fsdp(out):
    """Killed at step 3 under DDP, resumed under FSDP2 (DCP reshards model and AdamW state): equals the
    uninterrupted DDP run to FSDP's tolerance."""
    ddp, ddp_info = result(out, "ddp")
    for rank in (0, 1):
        resumed, info = result(out, "ddp_then_fsdp", rank)
        assert info["first"] == ddp_info["losses"][:3] and info["step"] == 6
        for k in ddp:
            torch.testing.assert_close(resumed[k], ddp[k], rtol=0, atol=FSDP_ATOL, msg=k)


def test_rank0_alone_writes_and_the_checkpoint_is_a_dcp_folder(out):
    from newllm.checkpoints.native import load_model
    from newllm.train.checkpoint import find_checkpoint, load_trainer_state
    from newllm.train.distributed import read_dcp_metadata

    run = out / "ddp"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # not 12: rank 1 wrote none
    folder = find_checkpoint(run)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert {"trainer.pt", "model.safetensors", "newllm.json", "rank-00000.pt", "rank-00001.pt", "dcp/.metadata",
            "checksums.json"} <= set(files)
    assert sorted(json.loads((folder / "checksums.json").read_text())) == [f for f in files if f != "checksums.json"]
    state = load_trainer_state(folder)
    assert state["distributed"] == {"world_size": 2, "kind": "ddp"} and state["step"] == 6
    assert "optimizer" not in state  # AdamW's moments are in dcp/
    read_dcp_metadata(folder / "dcp" / ".metadata")
    params = result(out, "ddp")[0]
    model = load_model(folder)  # the folder is still a model folder (rank 0 wrote the full weights)
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]), k


def test_one_process_refuses_a_distributed_checkpoint(out, shakespeare, make_model, make_cfg):
    from newllm.train import Trainer
    from newllm.train.checkpoint import find_checkpoint

    t = Trainer(make_cfg("x"), make_model(0), shakespeare[1][:N_TOKENS])
    with pytest.raises(NewLLMError, match=r"trainer\.pt: written by 2 processes .*resume it with torchrun"):
        t.load(find_checkpoint(out / "ddp"))


def test_a_distributed_resume_needs_as_many_processes_and_a_distributed_checkpoint(out, shakespeare, make_model,
                                                                                   make_cfg):
    from newllm.train import Trainer
    from newllm.train.checkpoint import find_checkpoint, load_trainer_state
    from newllm.train.distributed import World, load_checkpoint

    folder = find_checkpoint(out / "ddp")
    with pytest.raises(NewLLMError, match=r"written by 2 processes, this run has 4"):
        load_checkpoint(folder, load_trainer_state(folder), World(rank=0, world_size=4), None, None)
    single = make_cfg("single", max_steps=1)
    Trainer(single, make_model(0), shakespeare[1][:N_TOKENS]).run(tensorboard=False)
    folder = find_checkpoint(single.run_dir)
    with pytest.raises(NewLLMError, match=r"trainer\.pt: written by a single process; resume it without torchrun"):
        load_checkpoint(folder, load_trainer_state(folder), World(rank=0, world_size=2), None, None)


def test_dcp_metadata_naming_a_foreign_class_is_refused_without_running_it(tmp_path):
    from newllm.train.distributed import read_dcp_metadata

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / ".metadata"
    bad.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(NewLLMError, match=r"\.metadata: not a torch\.distributed\.checkpoint metadata file .*"
                                          r"names (posix|os)\.system"):
        read_dcp_metadata(bad)
    assert not marker.exists()
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(NewLLMError, match=r"\.metadata: not a torch\.distributed"):
        read_dcp_metadata(bad)


# ---------------------------------------------------------------------- decisions across ranks
@pytest.fixture(scope="module")
def edge(tmp_path_factory, shakespeare):
    tok, ids = shakespeare
    out = tmp_path_factory.mktemp("edge")
    nan_cfg = base_cfg(out / "nan", on_nonfinite="skip", max_nonfinite_skips=3)
    budget_cfg = base_cfg(out / "budget", max_steps=50, max_minutes=1.0, grad_accum=1)
    sync_cfg = base_cfg(out / "sync", max_steps=3, grad_accum=3, batch_size=2)
    launch("edge_cases", 2, str(out), ids[:N_TOKENS], tok.vocab_size, TINY_MODEL, nan_cfg, budget_cfg, sync_cfg)
    return out


def test_time_budget_stop_ends_every_rank(edge):
    """Rank 1's clock says 10 s per step, rank 0's is real: the slowest rank's time counts for both,
    so both stop after 6 steps of the 1-minute budget (rank 0 alone would have gone on to step 50,
    and waited forever for rank 1 in the next step's all-reduce)."""
    (p0, a), (p1, b) = result(edge, "budget", 0), result(edge, "budget", 1)
    assert a["done"] and b["done"]
    assert a["step"] == b["step"] == 6 and a["elapsed_s"] == b["elapsed_s"] == 60.0
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k


def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(edge):
    (p0, a), (p1, b) = result(edge, "nan", 0), result(edge, "nan", 1)
    assert a["skipped"] == b["skipped"] == 1 and a["step"] == b["step"] == 6
    assert a["losses"][1] is None and b["losses"][1] is None  # step 2: NaN, logged as null on both
    for k in p0:  # rank 0 saw a finite loss, yet did not step either
        assert torch.equal(p0[k], p1[k]), k
    assert len(a["warned"]) == 1 and "step 2: update skipped" in a["warned"][0] and b["warned"] == []


def test_gradient_accumulation_syncs_only_at_the_last_micro_batch(edge):
    """DDP all-reduces gradient buckets in the backward of micro-batch 2 of 0..2 alone (no_sync before)."""
    _, info = result(edge, "sync")
    fired = info["fired"]
    assert info["step"] == 3 and fired and len(fired) % 3 == 0
    assert set(fired) == {2}


# ---------------------------------------------------------------------- no processes needed
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_take_disjoint_slices_of_every_global_batch(shakespeare, world):
    from newllm.data.windows import TokenWindows
    from newllm.train.loop import WindowSampler
    from newllm.train.tbptt import ChunkSampler

    ids = shakespeare[1][:N_TOKENS]
    windows = TokenWindows(ids, 17, stride=16)
    samplers = {
        "windows": (WindowSampler(windows, 4, seed=0),
                    [WindowSampler(windows, 4, seed=0, rank=r, world_size=world) for r in range(world)]),
        "chunks": (ChunkSampler(ids, 8, 2, 4, 2, seed=0),
                   [ChunkSampler(ids, 8, 2, 4, 2, seed=0, rank=r, world_size=world) for r in range(world)]),
    }
    for one, ranks in samplers.values():
        for _ in range(12):  # across epoch boundaries
            parts = [s.next_batch() for s in ranks]
            assert all(len(p) == 4 // world for p in parts)
            assert torch.equal(torch.cat(parts), one.next_batch())
            assert all((s.epoch, s.index) == (one.epoch, one.index) for s in ranks)
    with pytest.raises(NewLLMError, match=r"batch_size 4 does not split into 3 processes"):
        WindowSampler(windows, 4, seed=0, rank=0, world_size=3)


def test_torchrun_environment_is_read_and_checked(monkeypatch):
    from newllm.train.distributed import init, launched, rank_device

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert launched() is None and init("cpu")[0].world_size == 1  # not launched by torchrun: one process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched() is None  # torchrun with one process: the ordinary run
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched() == (0, 2, 0)
    with pytest.raises(NewLLMError, match="RANK and WORLD_SIZE are set but not MASTER_ADDR / MASTER_PORT"):
        init("cpu")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(NewLLMError, match=r"environment RANK='two': not an integer"):
        launched()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(NewLLMError, match="need 0 <= RANK < WORLD_SIZE"):
        launched()
    assert rank_device("cpu", 1) == torch.device("cpu")
    for name in ("cuda:1", "mps"):
        with pytest.raises(NewLLMError, match="every rank uses cuda:LOCAL_RANK or the CPU"):
            rank_device(name, 0)


def test_distributed_field_is_checked(make_cfg):
    assert make_cfg(distributed="fsdp").distributed == "fsdp"
    with pytest.raises(NewLLMError, match=r"train: distributed must be one of \('ddp', 'fsdp'\), got 'zero'"):
        make_cfg(distributed="zero")


# ---------------------------------------------------------------------- torchrun -m newllm train
def test_torchrun_runs_newllm_train_in_two_processes(tmp_path, shared_dir):
    import yaml

    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text((shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:30000])
    recipe = {"model": {"preset": "pythia", "overrides": TINY_MODEL},
              "data": {"corpus": str(corpus), "bpe_vocab_size": 300, "cache_dir": str(tmp_path / "cache")},
              "eval": {"every": 0, "context": 32, "stride": 16, "batch_size": 4, "final_splits": ["valid"]},
              "device": "cpu", "seq_len": 16, "batch_size": 4, "grad_accum": 2, "max_steps": 4, "warmup_steps": 1,
              "log_every": 2, "checkpoint_every": 2, "progress": True, "run_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"

    def torchrun(*args):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "newllm", "train", *args, "--no-tensorboard"]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    p = torchrun("--config", str(tmp_path / "r.yaml"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert [r["split"] for r in records if r["kind"] == "final"] == ["valid"]
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 4 and results["processes"] == 2 and results["valid"]["token_ppl"] > 1
    assert (run / "checkpoints" / "step-0000004" / "dcp" / ".metadata").is_file()
    # stdout is a pipe: rank 0 printed one progress line per log_every steps (and rank 1 none)
    assert [line.split(" loss")[0] for line in p.stdout.splitlines() if line.startswith("step ")] == \
        ["step 2/4 (50%)", "step 4/4 (100%)"]
    assert p.stdout.count("newllm train: ") == 1 and "2 processes (ddp" in p.stdout
    # --resume under torchrun: the finished run extended by 2 steps, in the same run folder
    torchrun("--resume", str(run), "--set", "max_steps=6")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    assert json.loads((run / "results.json").read_text())["step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000006"]
