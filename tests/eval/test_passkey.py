"""passkey_eval on stub models whose answers we control, batching, the CLI (its fine-tune included)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from newllm import create_model, load_tokenizer
from newllm.data.bpe import train_bpe
from newllm.data.passkey import FILLER_SENTENCES, INTRO, NEEDLE, QUESTION, make_passkey_grid
from newllm.eval.passkey import PasskeyResult, passkey_eval, plot_passkey_heatmap
from tests.stubs import StubLM

LENGTHS, DEPTHS, N = [100, 200, 400], [0.0, 0.5, 1.0], 4


@pytest.fixture(scope="module")
def tok(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")


class Oracle(StubLM):
    """Reads the key out of the prompt and 'generates' `answer(key, prompt_len)` (tokenized, cut or padded
    with '.' to max_new_tokens); records each call's batch shape."""

    def __init__(self, tok, answer):
        super().__init__()
        self.tok, self.answer, self.shapes = tok, answer, []

    def generate(self, ids, max_new_tokens):
        self.shapes.append(tuple(ids.shape))
        rows = []
        for row in ids.tolist():
            key = re.search(r"The pass key is (\d+)\. Remember it", self.tok.decode(row)).group(1)
            new = (self.tok.encode(self.answer(key, len(row))) + self.tok.encode(".") * max_new_tokens)
            rows.append(row + new[:max_new_tokens])
        return torch.tensor(rows)


def test_right_stub_scores_one_wrong_stub_zero(tok):
    right = passkey_eval(Oracle(tok, lambda k, n: f" {k}. It"), tok, LENGTHS, DEPTHS, n_per_cell=N)
    wrong = passkey_eval(Oracle(tok, lambda k, n: f" {k[:-1]}"), tok, LENGTHS, DEPTHS, n_per_cell=N)
    longer = passkey_eval(Oracle(tok, lambda k, n: f" {k}0"), tok, LENGTHS, DEPTHS, n_per_cell=N)
    assert right.accuracy == [[1.0] * 3] * 3 and right.overall == 1.0
    assert wrong.accuracy == [[0.0] * 3] * 3 and longer.overall == 0.0
    assert len(right.samples) == 3 * 3 * N and all(s["correct"] for s in right.samples)
    assert right.samples[0]["generated"].startswith(f" {right.samples[0]['passkey']}.")
    d = right.to_dict()
    assert d["lengths"] == LENGTHS and d["depths"] == DEPTHS and d["n_per_cell"] == N and d["overall"] == 1.0


def test_mixed_stub_gives_the_expected_fraction_per_cell(tok):
    # right only for even keys on prompts under 300 tokens: the expected table comes from the grid itself
    stub = Oracle(tok, lambda k, n: f" {k}" if int(k) % 2 == 0 and n < 300 else " 0")
    res = passkey_eval(stub, tok, LENGTHS, DEPTHS, n_per_cell=N, seed=5)
    grid = make_passkey_grid(tok, LENGTHS, DEPTHS, N, seed=5)
    for i, L in enumerate(LENGTHS):
        for j, d in enumerate(DEPTHS):
            cell = [s for s in grid if s.length == L and s.depth == d]
            expect = sum(int(s.passkey) % 2 == 0 and len(s.ids) < 300 for s in cell) / N
            assert res.accuracy[i][j] == expect
    assert res.accuracy[2] == [0.0] * 3 and 0 < res.overall < 1  # seed 5 has some even keys in the short rows
    assert res.overall == pytest.approx(sum(map(sum, res.accuracy)) / 9, abs=1e-12)


def test_batches_hold_equal_lengths_only(tok):
    stub = Oracle(tok, lambda k, n: f" {k}")
    one = passkey_eval(stub, tok, LENGTHS, DEPTHS, n_per_cell=N, batch_size=1)
    assert all(b == 1 for b, _ in stub.shapes) and len(stub.shapes) == 36
    stub.shapes.clear()
    many = passkey_eval(stub, tok, LENGTHS, DEPTHS, n_per_cell=N, batch_size=5)
    lengths = sorted(s["tokens"] for s in many.samples)
    assert sum(b for b, _ in stub.shapes) == 36 and max(b for b, _ in stub.shapes) == 5 and len(stub.shapes) < 36
    assert sorted(t for b, t in stub.shapes for _ in range(b)) == lengths
    assert many.samples == one.samples


def test_tiny_model_batched_equals_one_by_one_and_memory_is_kept(tok):
    torch.manual_seed(0)
    model = create_model("infini", vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=4,
                         intermediate_size=64, num_hidden_layers=2, segment_length=32)
    model.train()
    model(torch.tensor([[5, 6, 7]]), update_memory=True)
    held = model.get_memory_state()
    a = passkey_eval(model, tok, [90, 120], [0.0, 1.0], n_per_cell=3, batch_size=1)
    b = passkey_eval(model, tok, [90, 120], [0.0, 1.0], n_per_cell=3, batch_size=3)
    assert [s["generated"] for s in a.samples] == [s["generated"] for s in b.samples]
    assert all(len(tok.encode(s["generated"])) == 7 for s in a.samples)  # digits + 2 new tokens
    assert model.training  # mode restored
    after = model.get_memory_state()
    assert held.tokens_absorbed == 3 and after.tokens_absorbed == 3  # the held memory is back


def test_heatmap_is_written(tmp_path):
    res = PasskeyResult([100, 200], [0.0, 0.5, 1.0], [[1.0, 0.5, 0.0], [0.25, 0.0, 1.0]], 4)
    plot_passkey_heatmap(res, tmp_path / "heat.png", title="t")
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pythia (max_position_embeddings 128) saved with its own small tokenizer."""
    from newllm.checkpoints.native import save_model

    root = tmp_path_factory.mktemp("cli_passkey")
    text = INTRO + "".join(FILLER_SENTENCES) * 3 + NEEDLE.format(key=12345) + QUESTION
    small = train_bpe([text] * 5, vocab_size=400)
    torch.manual_seed(0)
    model = create_model("pythia", vocab_size=small.vocab_size, hidden_size=32, num_attention_heads=4,
                         intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    save_model(model, root / "model")
    small.save(root / "model" / "tokenizer.json")
    return root, model.eval(), small


def test_cli_json_matches_the_library(saved, capsys):
    from newllm.cli import main

    root, model, small = saved
    argv = ["eval", "passkey", "--model", str(root / "model"), "--lengths", "100", "128", "--depths", "0", "1",
            "--n-per-cell", "2", "--seed", "3", "--batch-size", "2", "--no-progress", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    ref = passkey_eval(model, small, [100, 128], [0.0, 1.0], n_per_cell=2, seed=3)
    assert out["lengths"] == [100, 128] and out["depths"] == [0.0, 1.0] and out["n_per_cell"] == 2
    assert out["accuracy"] == ref.accuracy and out["overall"] == ref.overall
    assert [s["generated"] for s in out["samples"]] == [s["generated"] for s in ref.samples]
    assert out["note"] is None and out["finetune_losses"] == []


def test_cli_table_note_finetune_and_plot(saved, capsys, tmp_path):
    from newllm.cli import main

    root, *_ = saved
    argv = ["eval", "passkey", "--model", str(root / "model"), "--lengths", "100", "200", "--depths", "0", "0.5",
            "1", "--n-per-cell", "1", "--finetune-steps", "2", "--lr", "1e-3", "--plot", str(tmp_path / "h.png"),
            "--no-progress"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("exceed max_position_embeddings=128" in line and "pythia" in line for line in lines)
    assert any(line.startswith("finetune 2 steps, loss") for line in lines)
    rows = [line.split() for line in lines if line.strip().split(" ")[0] in ("100", "200")]
    assert [r[0] for r in rows] == ["100", "200"] and all(len(r) == 4 for r in rows)
    assert all(0.0 <= float(a) <= 1.0 for r in rows for a in r[1:])
    assert any(line.startswith("overall") for line in lines)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_one_line(saved, capsys):
    from newllm.cli import main

    root, *_ = saved
    assert main(["eval", "passkey", "--model", str(root / "model"), "--lengths", "20", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("newllm: error:") and "shorter than the prompt without filler" in err and "\n" not in err
