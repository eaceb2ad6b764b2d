"""Lagged Cache Training: cache keyed by sample, sweeps converging to the exact recurrence,
staleness, evaluation on the exact path, and the mode dispatch."""
from __future__ import annotations

import pytest
import torch

from newllm import NewLLMError, create_model
from newllm.train.lct import HiddenCache, LCTConfig, lct_loss, make_cache, sequential_loss, step_loss

TINY = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)
T = 10


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("context_pythia", **TINY)


def windows(n=6, seed=1):
    return torch.randint(0, 97, (n, T), generator=torch.Generator().manual_seed(seed))


def exact_loss(model, ids):
    return model(ids, labels=ids).loss


def test_enough_sweeps_equal_the_exact_recurrence(model):
    data = windows(3)
    cache = HiddenCache()
    cache.update([0, 1, 2], torch.randn(3, T, 32))  # an arbitrary (wrong) cache
    cfg = LCTConfig(refresh_sweeps=T - 1)
    with torch.no_grad():
        info = lct_loss(model, data, [0, 1, 2], cache, cfg, measure_staleness=True)
        torch.testing.assert_close(info.loss, exact_loss(model, data), atol=1e-5, rtol=0)
        exact_h = model.run_recurrence(data)[0]
    h, found = cache.gather([0, 1, 2], T, 32, "cpu", torch.float32)
    assert found.all()
    torch.testing.assert_close(h, exact_h, atol=1e-5, rtol=0)  # the stored cache is the exact one too
    assert info.staleness < 1e-5 and info.staleness_cached > 0.1


def test_seed_lct_is_an_approximation(model):
    data = windows(3)
    with torch.no_grad():
        info = lct_loss(model, data, [0, 1, 2], HiddenCache(), LCTConfig(refresh_sweeps=0))
        assert (info.loss - exact_loss(model, data)).abs() > 1e-4  # one warm-up sweep is not exact


def test_cache_is_keyed_by_sample_under_shuffling(model):
    """With fixed weights every visit is one more Jacobi sweep of that sample's own cache, so after
    v visits (plus the warm-up) a sample's cache is jacobi_hidden(sample, warmup + v sweeps);
    a cache keyed by batch position would mix samples under shuffling."""
    data = windows(6)
    cfg = LCTConfig(warmup_sweeps=1)
    cache, visits = HiddenCache(), [0] * 6
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for epoch in range(3):
            order = torch.randperm(6, generator=g)
            for batch in order.split(2):
                lct_loss(model, data[batch], batch, cache, cfg)
                for s in batch.tolist():
                    visits[s] += 1
            if epoch == 1:  # a sample not in every epoch
                lct_loss(model, data[[4]], [4], cache, cfg)
                visits[4] += 1
        for s in range(6):
            want = model.jacobi_hidden(data[s:s + 1], None, cfg.warmup_sweeps + visits[s])
            got, _ = cache.gather([s], T, 32, "cpu", torch.float32)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(cache) == 6 and visits[4] == 4


def test_cache_rejects_a_reused_id_with_another_length():
    cache = HiddenCache()
    cache.update([3], torch.zeros(1, T, 32))
    with pytest.raises(NewLLMError, match=r"sample id 3 has cached hidden states of shape \(10, 32\)"):
        cache.gather([3], T + 1, 32, "cpu", torch.float32)


def test_cache_storage_dtype_and_detach(model):
    cfg = LCTConfig(cache_dtype="bfloat16")
    cache = make_cache(model, cfg)
    info = lct_loss(model, windows(2), [5, 9], cache, cfg)
    info.loss.backward()
    stored = cache._store[5]
    assert stored.dtype == torch.bfloat16 and not stored.requires_grad and stored.shape == (T, 32)
    assert cache.nbytes == 2 * T * 32 * 2


def test_warmup_exact_starts_fresh(model):
    data = windows(2)
    with torch.no_grad():
        info = lct_loss(model, data, [0, 1], HiddenCache(), LCTConfig(warmup_exact=True), measure_staleness=True)
        torch.testing.assert_close(info.loss, exact_loss(model, data), atol=1e-5, rtol=0)
    assert info.num_warmed == 2 and info.staleness_cached < 1e-5


def test_staleness_appears_after_an_update_and_sweeps_reduce_it(model):
    data = windows(4)
    cfg = LCTConfig(warmup_exact=True)
    cache = HiddenCache()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    step = lct_loss(model, data, range(4), cache, cfg)
    step.loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        stale = lct_loss(model, data, range(4), cache, cfg, measure_staleness=True)  # cache from the old weights
    assert stale.staleness > 1e-4 and stale.staleness == stale.staleness_cached
    # refresh sweeps move a stale cache towards the current exact h
    cache2 = HiddenCache()
    cache2.update(list(range(4)), model.jacobi_hidden(data, None, 1))
    with torch.no_grad():
        a = lct_loss(model, data, range(4), cache2, LCTConfig(refresh_sweeps=0), measure_staleness=True)
        cache2.update(list(range(4)), model.jacobi_hidden(data, None, 1))
        b = lct_loss(model, data, range(4), cache2, LCTConfig(refresh_sweeps=3), measure_staleness=True)
    assert b.staleness < a.staleness and b.staleness_cached == pytest.approx(a.staleness_cached, abs=1e-6)


def test_evaluation_takes_the_exact_path(model):
    """After LCT steps the cache is stale; model(ids) (what every evaluator calls) ignores it and
    equals the exact recurrence, in train and eval mode alike."""
    data = windows(4)
    cfg = LCTConfig()
    cache = HiddenCache()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        info = lct_loss(model, data, range(4), cache, cfg)
        info.loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        lagged = lct_loss(model, data, range(4), cache, cfg).loss
        exact = sequential_loss(model, data, cfg)
        model.eval()
        torch.testing.assert_close(model(data, labels=data).loss, exact, atol=1e-6, rtol=0)
        h = model.run_recurrence(data)[0]
        from newllm.models.context import shift_context

        ref = model.forward_lagged(data, shift_context(h, model.initial_context(4)), labels=data)[0].loss
    torch.testing.assert_close(exact, ref, atol=1e-5, rtol=0)
    assert (lagged - exact).abs() > 1e-4
    # the project's evaluator (disjoint windows = the rows of `data`) scores the exact model
    from newllm.eval.perplexity import sliding_window_perplexity

    res = sliding_window_perplexity(model, data.flatten(), context=T, stride=T, batch_size=4, progress=False)
    assert res.n_tokens == 4 * (T - 1)
    assert res.token_ppl == pytest.approx(float(exact.exp()), rel=1e-5)


def test_modes(model):
    data = windows(2)
    par = step_loss("parallel", model, data).loss
    seq = step_loss("sequential", model, data).loss
    torch.testing.assert_close(par, seq, atol=1e-6, rtol=0)  # for a ContextLM, model(ids) is the recurrence
    cfg = LCTConfig(bptt_truncate=3)
    g_cut = torch.autograd.grad(step_loss("sequential", model, data, config=cfg).loss, model.h_init)[0]
    g_full = torch.autograd.grad(step_loss("sequential", model, data).loss, model.h_init)[0]
    assert (g_cut - g_full).abs().max() > 1e-7
    with pytest.raises(NewLLMError, match="needs the batch's sample ids"):
        step_loss("lct", model, data)
    with pytest.raises(NewLLMError, match="unknown training mode 'fast'"):
        step_loss("fast", model, data)
    torch.manual_seed(0)
    plain = create_model("pythia", **TINY)
    with pytest.raises(NewLLMError, match="needs a recurrent model") as e:
        step_loss("lct", plain, data, [0, 1], HiddenCache())
    assert "\n" not in str(e.value)
    with pytest.raises(NewLLMError, match="2 sample ids for a batch of 3"):
        lct_loss(model, windows(3), [0, 1], HiddenCache(), LCTConfig())


def test_held_memory_is_refused(model):
    model(windows(1), update_memory=True)
    with pytest.raises(NewLLMError, match="reset_memory"):
        lct_loss(model, windows(2), [0, 1], HiddenCache(), LCTConfig())


@pytest.mark.parametrize("bad", [dict(refresh_sweeps=-1), dict(cache_dtype="int8"), dict(bptt_truncate=0)],
                         ids=["sweeps", "dtype", "bptt"])
def test_config_validation(bad):
    with pytest.raises(NewLLMError, match=next(iter(bad))):
        LCTConfig(**bad)


# ---------------------------------------------------------------------- through `newllm train --mode`
RECIPE = {
    "model": {"preset": "context_pythia", "overrides": {"hidden_size": 32, "num_attention_heads": 4,
                                                        "intermediate_size": 64, "num_hidden_layers": 2}},
    "data": {"corpus": None, "bpe_vocab_size": 300},
    "eval": {"every": 2, "context": 16, "stride": 16, "batch_size": 8, "max_tokens": 128, "final_splits": ["valid"]},
    "device": "cpu", "seq_len": 16, "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "lr": 3e-3, "min_lr": 3e-4,
    "log_every": 1, "checkpoint_every": 0, "progress": False, "lct": {"staleness_every": 2},
}


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory, shared_dir):
    import json

    import yaml

    root = tmp_path_factory.mktemp("lct_cli")
    corpus = root / "shakespeare.txt"
    corpus.write_text((shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:12000])
    d = json.loads(json.dumps(RECIPE))
    d["data"]["corpus"], d["data"]["cache_dir"] = str(corpus), str(root / "cache")
    (root / "tiny.yaml").write_text(yaml.safe_dump(d))
    return root


def test_newllm_train_mode_lct(recipe_path):
    import json

    from newllm.checkpoints.native import load_model
    from newllm.cli import main
    from newllm.models.context import ContextLM

    run_dir = recipe_path / "run_lct"
    rc = main(["train", "--config", str(recipe_path / "tiny.yaml"), "--mode", "lct", "--set", f"run_dir={run_dir}",
               "--no-tensorboard"])
    assert rc == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stale = [r for r in records if r["kind"] == "lct"]
    assert [r["step"] for r in stale] == [2, 4]
    assert all(r["staleness"] > 0 and 0 < r["staleness_rel"] < 10 for r in stale)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    results = json.loads((run_dir / "results.json").read_text())
    assert 1 < results["valid"]["token_ppl"] < 300
    assert "mode: lct" in (run_dir / "config.yaml").read_text()
    assert isinstance(load_model(run_dir / "final"), ContextLM)


def test_newllm_train_mode_needs_a_recurrent_model(recipe_path, capsys):
    from newllm.cli import main

    rc = main(["train", "--config", str(recipe_path / "tiny.yaml"), "--mode", "sequential",
               "--set", "model.preset=pythia", "--set", f"run_dir={recipe_path / 'run_bad'}", "--no-tensorboard"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a recurrent model" in err and err.count("\n") == 1
