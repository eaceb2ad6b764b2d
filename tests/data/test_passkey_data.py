"""Passkey prompts (real GPT-NeoX tokenizer) and the scorer."""
from __future__ import annotations

import random

import pytest

from newllm import load_tokenizer
from newllm.data.passkey import FILLER_SENTENCES, INTRO, QUESTION, make_passkey_grid, make_passkey_sample, score_passkey
from newllm.errors import NewLLMError


@pytest.fixture(scope="module")
def tok(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")


@pytest.fixture(scope="module")
def unit(tok):
    return sum(len(tok.encode(s)) for s in FILLER_SENTENCES)


LENGTHS, DEPTHS = [128, 300, 1000], [0.0, 0.25, 0.5, 0.75, 1.0]


def test_grid_is_deterministic_in_the_seed(tok):
    a = make_passkey_grid(tok, LENGTHS, DEPTHS, 2, seed=7)
    b = make_passkey_grid(tok, LENGTHS, DEPTHS, 2, seed=7)
    c = make_passkey_grid(tok, LENGTHS, DEPTHS, 2, seed=8)
    assert len(a) == len(LENGTHS) * len(DEPTHS) * 2
    assert [s.ids for s in a] == [s.ids for s in b] and [s.passkey for s in a] == [s.passkey for s in b]
    assert sum(x.passkey != y.passkey for x, y in zip(a, c)) >= len(a) - 2  # 5-digit keys rarely collide
    assert [(s.length, s.depth) for s in a] == [(L, d) for L in LENGTHS for d in DEPTHS for _ in range(2)]
    assert all(len(s.passkey) == 5 and s.passkey[0] != "0" for s in a)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_length_depth_and_text(tok, unit, length, depth):
    s = make_passkey_sample(tok, length, depth, random.Random(3))
    assert length - unit < len(s.ids) <= length
    text = tok.decode(s.ids)
    needle = f"The pass key is {s.passkey}. Remember it. {s.passkey} is the pass key."
    assert text.count(needle) == 1 and text.endswith("The pass key is")
    assert text.startswith("There is an important info hidden")
    # key_position is the needle's first token, exactly
    assert tok.decode(s.ids[s.key_position:]).startswith(" " + needle)
    # depth: the needle sits after round(depth * sentences) filler sentences, so its place in the filler is
    # off by at most one sentence's tokens; in the whole prompt the intro and question shift it a little more
    intro = len(tok.encode(INTRO))
    filler = len(s.ids) - intro - len(tok.encode(" " + needle)) - len(tok.encode(QUESTION))
    longest = max(len(tok.encode(x)) for x in FILLER_SENTENCES)
    assert abs((s.key_position - intro) / filler - depth) <= longest / filler
    assert abs(s.key_position / len(s.ids) - depth) <= (intro + longest) / len(s.ids)


def test_prompt_tokens_equal_the_joined_text(tok):
    s = make_passkey_sample(tok, 500, 0.4, 11)
    assert tok.encode(tok.decode(s.ids)) == s.ids  # byte-level BPE: pieces concatenate exactly


def test_bad_passkey_input(tok):
    with pytest.raises(NewLLMError, match="shorter than the prompt without filler"):
        make_passkey_sample(tok, 20, 0.5, 0)
    with pytest.raises(NewLLMError, match="depth must be in"):
        make_passkey_sample(tok, 200, 1.5, 0)
    with pytest.raises(NewLLMError, match="digits must be"):
        make_passkey_sample(tok, 200, 0.5, 0, digits=0)


@pytest.mark.parametrize("text,ok", [(" 71432.", True), ("71432", True), (" 71432 is it", True),
                                     (" 7143", False), (" 714325", False), (" no digits.", False), ("", False),
                                     (" 1 71432", False), (" 71,432", False)])
def test_score_passkey(text, ok):
    assert score_passkey(text, "71432") is ok


@pytest.mark.parametrize("lead", [0, 7])
def test_passkey_at_distance_is_exact_at_every_distance(tok, lead):
    from newllm.data.passkey import NEEDLE, make_passkey_at_distance

    q = len(tok.encode(QUESTION))
    rng = random.Random(5)
    for distance in [*range(q, q + 120), 500, 1024, 4097]:
        s = make_passkey_at_distance(tok, distance, rng, digits=5, lead=lead)
        needle = tok.encode(NEEDLE.format(key=s.passkey))
        end = s.key_position + len(needle) - 1  # the needle's last token
        assert s.ids[s.key_position:end + 1] == needle and s.distance == distance
        assert len(s.ids) - 1 - end == distance, distance  # the answer is predicted exactly `distance` after
        assert s.ids[-q:] == tok.encode(QUESTION) and s.key_position == len(tok.encode(INTRO)) + lead
    with pytest.raises(NewLLMError, match="shorter than the question"):
        make_passkey_at_distance(tok, q - 1, rng)
