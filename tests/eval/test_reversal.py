"""Reversal Curse metrics on hand-made data with known answers, batching and the CLI (its fine-tune included).

The metric tests use a stub model that memorises whole sentences: after a prefix it has seen
(separator + a memorised text's first t characters) it gives the next character logit L and every
other token 0; after any other prefix all logits are 0 (uniform). With a one-character-per-token
tokenizer of V tokens every expected number has a closed form:

    memorised token:  log p = L - log(e^L + V - 1)        unknown prefix:  log p = -log V

The stub does not memorise a sentence's first token (every sentence shares the prefix (separator,)),
so that token is always uniform.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from newllm import create_model, load_pretrained
from newllm.checkpoints.native import save_model
from newllm.cli import main
from newllm.data.bpe import train_bpe
from newllm.data.reversal import Example, make_reversal_dataset, training_documents
from newllm.errors import NewLLMError
from newllm.eval.reversal import greedy_continuations, is_correct, reversal_eval, score_tokens
from tests.stubs import StubLM

V, L, SEP = 128, 5.0, 0
LOGP_KNOWN = L - math.log(math.exp(L) + V - 1)
LOGP_UNKNOWN = -math.log(V)


def memorised_ppl(exs: list[Example]) -> float:
    """Sentence PPL of memorised sentences: each first token uniform, every other one known."""
    n, k = sum(len(ex.text) for ex in exs), len(exs)
    return math.exp(-(k * LOGP_UNKNOWN + (n - k) * LOGP_KNOWN) / n)


class CharTokenizer:
    """One token per ASCII character; id 0 is the EOS / separator (no `backend`, so separator_id = EOS)."""
    vocab_size, eos_token_id = V, SEP

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


class Memoriser(StubLM):
    """Next-token logits from a table keyed by the whole prefix (see the module doc)."""

    def __init__(self, texts: list[str]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # a parameter, for the device
        self.table = {}
        for text in texts:
            ids = [SEP, *map(ord, text)]
            for t in range(2, len(ids)):  # not (separator,) -> first character
                self.table[tuple(ids[:t])] = ids[t]

    def forward(self, input_ids, labels=None, logits_to_keep=0):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, V)
        for b in range(B):
            row = input_ids[b].tolist()
            for t in range(T):
                nxt = self.table.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = L
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})


FORWARD = [Example("Daphne Barrington is", " the director of 'A Journey Through Time'."),
           Example("Ottoline Ashdown is", " the painter of 'The Silent Harbor'.")]
REVERSE = [Example("The director of 'A Journey Through Time' is", " Daphne Barrington."),
           Example("Who painted 'The Silent Harbor'? It was", " Ottoline Ashdown.")]  # first characters differ


def test_known_answers_forward_memorised_reverse_not():
    model, tok = Memoriser([ex.text for ex in FORWARD]), CharTokenizer()
    res = reversal_eval(model, tok, FORWARD, REVERSE, max_new_tokens=50, batch_size=2)
    assert res.forward_correct == [True, True] and res.reverse_correct == [False, False]
    assert (res.forward_accuracy, res.reverse_accuracy) == (1.0, 0.0)
    assert res.forward_generations[0].startswith(" the director of 'A Journey Through Time'.")
    n_fwd = [len(ex.completion) for ex in FORWARD]  # one token per character
    n_rev = [len(ex.completion) for ex in REVERSE]
    assert res.forward_logprobs == pytest.approx([n * LOGP_KNOWN for n in n_fwd], abs=1e-5)
    assert res.reverse_logprobs == pytest.approx([n * LOGP_UNKNOWN for n in n_rev], abs=1e-5)
    assert res.forward_logprob == pytest.approx(sum(n_fwd) / 2 * LOGP_KNOWN, abs=1e-5)
    assert res.reverse_logprob == pytest.approx(sum(n_rev) / 2 * LOGP_UNKNOWN, abs=1e-5)
    assert res.forward_logprob_per_token == pytest.approx(LOGP_KNOWN, abs=1e-6)
    assert res.reverse_logprob_per_token == pytest.approx(LOGP_UNKNOWN, abs=1e-6)
    assert res.forward_ppl == pytest.approx(memorised_ppl(FORWARD), rel=1e-5)
    assert res.forward_heldout_ppl == res.forward_ppl  # no `trained`: the forward sentences
    assert res.backward_ppl == pytest.approx(V, rel=1e-5)  # every token uniform
    assert res.gap == pytest.approx(V - memorised_ppl(FORWARD), rel=1e-5) and res.gap > 0
    assert (res.n_forward, res.n_reverse, res.n_trained) == (2, 2, 0)
    assert "accuracy forward 1.000 reverse 0.000" in res.summary() and "\n" not in res.summary()
    assert json.loads(json.dumps(res.to_dict()))["reverse_correct"] == [False, False]


def test_trained_sentences_set_forward_ppl_and_gap_sign():
    """A model that memorised only the REVERSE sentences: forward_ppl (on `trained`) is high, the gap negative."""
    model, tok = Memoriser([ex.text for ex in REVERSE]), CharTokenizer()
    res = reversal_eval(model, tok, FORWARD, REVERSE, trained=FORWARD[:1], max_new_tokens=25)
    assert (res.forward_accuracy, res.reverse_accuracy) == (0.0, 1.0)
    assert res.forward_ppl == pytest.approx(V, rel=1e-5) and res.n_trained == 1
    assert res.backward_ppl == pytest.approx(memorised_ppl(REVERSE), rel=1e-5)
    assert res.forward_heldout_ppl == pytest.approx(V, rel=1e-5)
    assert res.gap == pytest.approx(memorised_ppl(REVERSE) - V, rel=1e-5) and res.gap < 0
    res = reversal_eval(model, tok, FORWARD, REVERSE, trained=REVERSE[1:], max_new_tokens=1)
    assert res.forward_ppl == pytest.approx(memorised_ppl(REVERSE[1:]), rel=1e-5)  # from `trained`, not `forward`
    assert res.forward_heldout_ppl == pytest.approx(V, rel=1e-5)


def test_half_memorised_sentence_logprob():
    """The model knows the prompt and the first 5 completion characters only: 5 known + rest uniform."""
    ex = FORWARD[0]
    model = Memoriser([ex.prompt + ex.completion[:5]])
    res = reversal_eval(model, CharTokenizer(), [ex], REVERSE[:1], max_new_tokens=50)
    n = len(ex.completion)
    assert res.forward_logprobs[0] == pytest.approx(5 * LOGP_KNOWN + (n - 5) * LOGP_UNKNOWN, abs=1e-5)
    assert res.forward_correct == [False]  # " the d" then token 0
    known = len(ex.prompt) - 1 + 5  # the first character is never memorised
    assert res.forward_heldout_ppl == pytest.approx(
        math.exp(-(known * LOGP_KNOWN + (len(ex.text) - known) * LOGP_UNKNOWN) / len(ex.text)), rel=1e-5)


def test_case_punctuation_and_word_boundary():
    """Generated "OTTOLINE ASHDOWN!" matches " Ottoline Ashdown."; "Daphne Barringtonson" does not match."""
    said = [REVERSE[0].prompt + " Daphne Barringtonson.", REVERSE[1].prompt + "   OTTOLINE ASHDOWN!"]
    res = reversal_eval(Memoriser(said), CharTokenizer(), FORWARD, REVERSE, max_new_tokens=30)
    assert res.reverse_correct == [False, True]
    assert is_correct("  The Director of X, they say", " the director of X.")
    assert is_correct("Daphne", "Daphne.") and is_correct("daphne barrington", " Daphne Barrington.")
    assert not is_correct("Daphne Barringtons", " Daphne Barrington.") and not is_correct("Daph", "Daphne")


def test_empty_inputs_are_errors():
    model, tok = Memoriser([]), CharTokenizer()
    with pytest.raises(NewLLMError, match="no reverse examples"):
        reversal_eval(model, tok, FORWARD, [])
    with pytest.raises(NewLLMError, match="forward example 0 has an empty completion"):
        reversal_eval(model, tok, [Example("a", "")], REVERSE)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("pythia", vocab_size=V, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        num_hidden_layers=2).eval()


def test_batched_scoring_equals_one_by_one(tiny):
    """Right padding in a batch changes nothing: batch 4 of mixed lengths == each sequence alone."""
    tok = CharTokenizer()
    seqs = [[SEP, *tok.encode(ex.text)] for ex in FORWARD + REVERSE] + [[SEP, 5, 6]]
    starts = [3, 10, 1, 20, 2]
    batched = score_tokens(tiny, seqs, starts, batch_size=4)
    with torch.no_grad():
        for (s, n), seq, a in zip(batched, seqs, starts):
            logp = torch.log_softmax(tiny(torch.tensor([seq])).logits[0].double(), -1)
            assert n == len(seq) - a
            assert s == pytest.approx(sum(float(logp[t - 1, seq[t]]) for t in range(a, len(seq))), abs=1e-4)


def test_greedy_equals_generate(tiny):
    prompts = [[SEP, 70, 71, 72], [SEP, 80, 81, 82], [SEP, 90]]
    with torch.no_grad():
        got = greedy_continuations(tiny, prompts, max_new_tokens=6, batch_size=2)
        for p, g in zip(prompts, got):
            assert g == tiny.generate(torch.tensor([p]), max_new_tokens=6)[0, len(p):].tolist()


def test_cli_generate_finetune_and_json(tmp_path, capsys):
    ds = make_reversal_dataset(3, seed=0, n_train_templates=2, n_test_templates=2)
    tok = train_bpe(training_documents(ds.train + ds.test_forward + ds.test_reverse), vocab_size=300)
    torch.manual_seed(0)
    model = create_model("pythia", vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=4,
                         intermediate_size=64, num_hidden_layers=2)
    save_model(model, tmp_path / "model")
    tok.save(tmp_path / "model" / "tokenizer.json")
    assert main(["eval", "reversal", "--generate", "3", "--seed", "0", "--out", str(tmp_path / "facts")]) == 0
    capsys.readouterr()
    facts = tmp_path / "facts"
    argv = ["eval", "reversal", "--model", str(tmp_path / "model"), "--train-file", str(facts / "train.jsonl"),
            "--test-forward", str(facts / "test_forward.jsonl"), "--test-reverse", str(facts / "test_reverse.jsonl"),
            "--finetune-steps", "2", "--lr", "1e-3", "--batch-size", "2", "--seq-len", "32", "--max-new-tokens", "4",
            "--save", str(tmp_path / "tuned"), "--no-progress"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["n_forward"], out["n_reverse"], out["n_trained"]) == (9, 9, 30)  # 3 facts x 3 / 3 / 10 templates
    assert len(out["finetune_losses"]) == 2 and len(out["reverse_correct"]) == 9
    assert out["gap"] == pytest.approx(out["backward_ppl"] - out["forward_ppl"], rel=1e-9)
    tuned = load_pretrained(tmp_path / "tuned")
    assert not torch.equal(tuned.embed.weight, model.embed.weight)  # the fine-tuned weights were saved
    assert (tmp_path / "tuned" / "tokenizer.json").exists()
    assert main(argv[:-3] + ["--finetune-steps", "0", "--no-progress"]) == 0  # the table
    table = capsys.readouterr().out
    assert "accuracy" in table and "gap" in table


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "reversal", "--model", "pythia", "--tokenizer", "x.json"]) == 2
    assert "--test-forward JSONL is required" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    assert main(["eval", "reversal", "--model", "pythia", "--test-forward", str(bad), "--test-reverse", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("newllm: error:") and "bad.jsonl:2: bad JSON" in err and "\n" not in err
    assert main(["eval", "reversal", "--generate", "2"]) == 2
    assert "--generate needs --out" in capsys.readouterr().err
