"""Reversal Curse data: the paper's JSONL format (round trip, errors) and the fictitious-fact generator."""
from __future__ import annotations

import pytest

from newllm.data.reversal import (TEST_FORWARD_TEMPLATES, TEST_REVERSE_TEMPLATES, TRAIN_TEMPLATES, Example,
                                  ReversalDataset, make_facts, make_reversal_dataset, read_jsonl,
                                  training_documents, write_jsonl)
from newllm.errors import NewLLMError


def test_jsonl_round_trip(tmp_path):
    exs = [Example("Daphne Barrington is", " the director of 'A Journey Through Time'.", 3),
           Example("Ünïcode \"quoted\" is", " fine.\n")]
    path = write_jsonl(exs, tmp_path / "a.jsonl")
    assert read_jsonl(path) == exs
    assert exs[0].text == "Daphne Barrington is the director of 'A Journey Through Time'."


def test_jsonl_paper_format_blank_lines_and_extra_keys(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "A is", "completion": " B", "id": 7}\n\n   \n{"completion": " D", "prompt": "C is"}\n')
    assert read_jsonl(p) == [Example("A is", " B"), Example("C is", " D")]


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", '], "bad.jsonl:2: bad JSON"),
    (['', '{"prompt": "a"}'], "bad.jsonl:2: missing key 'completion'"),
    (['{"completion": "b"}'], "bad.jsonl:1: missing key 'prompt'"),
    (['{"prompt": 3, "completion": "b"}'], "bad.jsonl:1: 'prompt' must be a string, got int"),
    (['["a", "b"]'], "bad.jsonl:1: expected a JSON object, got list"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, match):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(NewLLMError, match=match) as e:
        read_jsonl(p)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(NewLLMError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_generator_is_deterministic_per_seed():
    a, b, c = make_reversal_dataset(20, seed=1), make_reversal_dataset(20, seed=1), make_reversal_dataset(20, seed=2)
    assert a == b
    assert a.train != c.train and make_facts(20, 1) != make_facts(20, 2)


def test_generator_structure():
    n, k, m = 50, 7, 3
    ds = make_reversal_dataset(n, seed=0, n_train_templates=k, n_test_templates=m)
    facts = make_facts(n, seed=0)
    names, descs = [f[0] for f in facts], [f[1] for f in facts]
    assert len(set(names)) == n and len(set(descs)) == n
    assert not any(a != b and b.startswith(a) for a in names for b in names)  # no name is a prefix of another
    assert (len(ds.train), len(ds.test_forward), len(ds.test_reverse)) == (n * k, n * m, n * m)
    for ex in ds.test_reverse:  # reverse: description first, completion = the name
        name, desc = facts[ex.fact]
        assert ex.completion == f" {name}." and desc[1:] in ex.prompt and name not in ex.prompt
    for ex in ds.train + ds.test_forward:  # forward: name first, completion = the description
        name, desc = facts[ex.fact]
        assert ex.completion == f" {desc}." and name in ex.prompt
    assert {ex.fact for ex in ds.train} == {ex.fact for ex in ds.test_forward} == set(range(n))
    assert all(sum(ex.fact == i for ex in ds.train) == k for i in range(n))


def test_no_template_shared_between_train_and_test():
    ds = make_reversal_dataset(30, seed=0)
    facts = make_facts(30, seed=0)

    def template(ex):
        name, desc = facts[ex.fact]
        return ex.prompt.replace(name, "{name}").replace(desc, "{d}").replace(desc[0].upper() + desc[1:], "{D}")

    train_t = {template(ex) for ex in ds.train}
    fwd_t, rev_t = {template(ex) for ex in ds.test_forward}, {template(ex) for ex in ds.test_reverse}
    assert train_t == set(TRAIN_TEMPLATES) and fwd_t == set(TEST_FORWARD_TEMPLATES)
    assert rev_t == set(TEST_REVERSE_TEMPLATES)
    assert not train_t & fwd_t and not train_t & rev_t and not fwd_t & rev_t
    train_prompts = {ex.prompt for ex in ds.train}
    assert not train_prompts & {ex.prompt for ex in ds.test_forward + ds.test_reverse}


def test_save_load(tmp_path):
    ds = make_reversal_dataset(5, seed=3, n_train_templates=2, n_test_templates=1)
    ds.save(tmp_path / "facts")
    assert sorted(p.name for p in (tmp_path / "facts").iterdir()) == ["test_forward.jsonl", "test_reverse.jsonl",
                                                                      "train.jsonl"]
    assert ReversalDataset.load(tmp_path / "facts") == ds


def test_training_documents():
    exs = [Example("A is", " B."), Example("C is", " D.")]
    assert training_documents(exs) == ["A is B.", "C is D."]
    assert training_documents(exs, repeats=2) == ["A is B.", "C is D.", "A is B.", "C is D."]
    with pytest.raises(NewLLMError, match="repeats must be >= 1"):
        training_documents(exs, repeats=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"n_facts": 0}, "n_facts must be in 1..1024"),
    ({"n_facts": 5000}, "n_facts must be in 1..1024"),
    ({"n_facts": 3, "n_train_templates": 11}, "n_train_templates must be in 1..10"),
    ({"n_facts": 3, "n_test_templates": 0}, "n_test_templates must be in 1..3"),
])
def test_generator_errors(kwargs, match):
    with pytest.raises(NewLLMError, match=match):
        make_reversal_dataset(**kwargs)
