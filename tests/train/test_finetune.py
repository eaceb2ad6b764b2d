"""The fine-tune loop (the gates' own lr, falling losses, seeded runs, the held memory) and the three
tasks on it: passkey prompts (loss on the key only), associative recall, texts (Reversal Curse facts)."""
from __future__ import annotations

import itertools
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from newllm import create_model, load_tokenizer
from newllm.data.bpe import train_bpe
from newllm.data.passkey import FILLER_SENTENCES, INTRO, NEEDLE, QUESTION, make_passkey_grid
from newllm.data.reversal import make_reversal_dataset, training_documents
from newllm.errors import NewLLMError
from newllm.train.finetune import finetune, finetune_on_texts, passkey_finetune, recall_train
from tests.stubs import StubLM

T, B = 32, 4


def windows(tokens, seed: int):
    """Endless (ids, labels) batches of B windows of T real-text tokens at seeded random offsets."""
    stream = torch.as_tensor(tokens.astype("int64"))
    g = torch.Generator().manual_seed(seed)
    while True:
        offsets = torch.randint(0, len(stream) - T, (B,), generator=g).tolist()
        x = torch.stack([stream[o:o + T] for o in offsets])
        yield x, x


def gates_and_rest(model):
    gates = [p for layer in model.layers for p in layer.param_groups().get("gates", [])]
    taken = {id(p) for p in gates}
    return gates, [p for p in model.parameters() if id(p) not in taken]


@pytest.mark.parametrize("gate_lr", [None, 1e-2])
def test_gates_get_their_own_lr_when_asked(make_model, shakespeare, gate_lr):
    # AdamW's first step moves every parameter with a gradient by about its group's lr (m / sqrt(v) = +-1),
    # whatever the gradient's size: a base lr of 1e-5 and a gate lr of 1e-2 are told apart by the step alone
    model = make_model(preset="infini", segment_length=8)
    gates, rest = gates_and_rest(model)
    assert gates  # the beta of each Infini layer
    before = [p.detach().clone() for p in gates + rest]
    groups = None if gate_lr is None else {"gates": {"lr": gate_lr}}
    finetune(model, windows(shakespeare[1], 0), steps=1, lr=1e-5, param_groups=groups)
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(gates + rest, before)]
    gate_moves, rest_moves = moved[:len(gates)], moved[len(gates):]
    assert 0.5e-5 < max(rest_moves) < 1.01e-5  # (float32 rounding of the weights: the 1%)
    want = 1e-5 if gate_lr is None else gate_lr
    assert all(0.5 * want < m < 1.01 * want for m in gate_moves), (gate_moves, want)


def test_the_optimizer_groups_come_from_build_param_groups(make_model, shakespeare, monkeypatch):
    seen = []
    real = torch.optim.AdamW

    def spy(groups, **kw):
        seen.append([(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups])
        return real(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    model = make_model(preset="infini", segment_length=8)
    finetune(model, windows(shakespeare[1], 0), steps=1, lr=1e-3, weight_decay=0.1,
             param_groups={"gates": {"lr": 5e-2}})
    names = {name: (lr, wd) for name, lr, wd, _ in seen[0]}
    assert names == {"decay": (1e-3, 0.1), "no_decay": (1e-3, 0.0), "gates": (5e-2, 0.0)}
    assert dict((n, k) for n, _, _, k in seen[0])["gates"] == len(gates_and_rest(model)[0])  # the layers' betas


def test_a_group_no_layer_requests_is_an_error(make_model, shakespeare):
    model = make_model()  # pythia: no gates
    with pytest.raises(NewLLMError, match=r"\['gates'\] requested by no layer"):
        finetune(model, windows(shakespeare[1], 0), steps=1, lr=1e-3, param_groups={"gates": {"lr": 1e-2}})


def test_losses_fall_and_the_same_seed_gives_the_same_losses(make_model, shakespeare):
    runs = [finetune(make_model(seed=0), windows(shakespeare[1], seed), steps=30, lr=3e-3) for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and len(runs[0]) == 30
    assert runs[2] != runs[0]  # other batches
    assert sum(runs[0][-5:]) / 5 < sum(runs[0][:5]) / 5 - 0.5, runs[0]


def test_held_memory_set_aside_restored_and_eval_mode(make_model, shakespeare):
    tokens = shakespeare[1]
    fresh = finetune(make_model(preset="infini", segment_length=8), windows(tokens, 3), steps=3, lr=1e-3)
    model = make_model(preset="infini", segment_length=8)
    with torch.no_grad():
        model(torch.as_tensor(tokens[:40].astype("int64"))[None], update_memory=True)
    held = model.get_memory_state()
    modes = []
    hook = model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    model.train()
    losses = finetune(model, windows(tokens, 3), steps=3, lr=1e-3)
    hook.remove()
    assert losses == fresh  # every batch started from an empty memory, not from the held one
    assert modes == [True] * 3 and not model.training  # trained in train mode, left in eval mode
    after = model.get_memory_state()
    assert after.tokens_absorbed == held.tokens_absorbed == 40
    for a, b in zip(held.entries, after.entries):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors or (), b.tensors or ()))


def test_bad_input(make_model, shakespeare):
    model = make_model()
    batch = next(windows(shakespeare[1], 0))
    with pytest.raises(NewLLMError, match="recall: the batches ran out after 2 of 3 steps"):
        finetune(model, itertools.repeat(batch, 2), steps=3, lr=1e-3, desc="recall")
    with pytest.raises(NewLLMError, match="lr > 0"):
        finetune(model, itertools.repeat(batch), steps=1, lr=0.0)
    assert finetune(model.train(), iter(()), steps=0, lr=1e-3) == [] and not model.training


def test_the_experiment_gives_its_gate_lr_to_the_fine_tunes():
    # newllm/experiment/run.py hands these settings to passkey_finetune and recall_train
    from newllm.experiment.config import ExperimentConfig
    from newllm.experiment.run import finetune_groups

    cfg = ExperimentConfig(gate_lr=2e-2)
    assert finetune_groups(cfg.train_config("infini", 1)) == {"gates": {"lr": 2e-2}}
    assert finetune_groups(cfg.train_config("pythia", 1)) is None  # no gates: every group at the base lr
    assert finetune_groups(ExperimentConfig().train_config("infini", 1)) is None  # gate_lr unset: the base lr


# ------------------------------------------------------------------------------ passkey
@pytest.fixture(scope="module")
def tok(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")


class Recorder(StubLM):
    """Records the (ids, labels) of each training step; its loss is a function of one weight."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, ids, labels=None):
        self.calls.append((ids.clone(), labels.clone(), self.training))
        return SimpleNamespace(loss=self.w ** 2)


def test_finetune_puts_the_loss_on_the_key_tokens_only(tok):
    rec = Recorder().eval()
    losses = passkey_finetune(rec, tok, steps=3, lengths=[80, 150], batch_size=2, lr=0.1, seed=0)
    assert len(losses) == 3 and losses[0] == 1.0 and losses[1] < 1.0  # AdamW moved the weight
    eval_keys = {s.passkey for s in make_passkey_grid(tok, [80, 150], [0.0, 0.5, 1.0], 5, seed=0)}
    for ids, labels, training in rec.calls:
        assert training and ids.shape[0] == 2 and ids.shape[1] <= 150 + 3
        for row, lab in zip(ids, labels):
            where = (lab != -100).nonzero().flatten()
            assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))  # one contiguous run
            prompt = tok.decode(row[:where[0]].tolist())
            answer = tok.decode(lab[where].tolist())
            assert prompt.endswith("The pass key is") and (row[where] == lab[where]).all()
            key = re.search(r"The pass key is (\d+)\. Remember", prompt).group(1)
            assert answer == f" {key}" and key not in eval_keys
    assert not rec.training  # trained in train mode, then put back in eval mode


def test_finetune_lowers_the_key_loss_of_a_tiny_model():
    # a small BPE learned from the prompt pieces (synthetic task: synthetic text is the point here)
    text = INTRO + "".join(FILLER_SENTENCES) * 3 + NEEDLE.format(key=12345) + QUESTION
    small = train_bpe([text] * 5, vocab_size=400)
    torch.manual_seed(0)
    model = create_model("pythia", vocab_size=small.vocab_size, hidden_size=32, num_attention_heads=4,
                         intermediate_size=64, num_hidden_layers=1)
    losses = passkey_finetune(model, small, steps=30, lengths=[128], lr=3e-3, batch_size=4, seed=1)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    # starts near ln(390) = 5.97; learning that digits follow "The pass key is" alone brings it near
    # ln 10 = 2.3 per digit (measured: mean of the last five 2.66)
    assert losses[0] > 5.5 and sum(losses[-5:]) / 5 < losses[0] - 2, losses


# ------------------------------------------------------------------------------ associative recall
def test_recall_train_learns_the_value_set():
    torch.manual_seed(0)
    model = create_model("pythia", vocab_size=35, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         num_hidden_layers=1)
    losses = recall_train(model, steps=40, n_pairs=4, segment_length=9, batch=32, lr=3e-3, seed=0)
    assert len(losses) == 40 and losses[0] > math.log(35) - 0.3
    # a model that only learns "a value comes here" reaches ln 16 = 2.77; far from the start of ~ln 35 = 3.56
    assert sum(losses[-5:]) / 5 < math.log(16) + 0.15, losses[-5:]


# ------------------------------------------------------------------------------ texts (Reversal Curse facts)
def test_finetune_on_texts_is_seeded_and_learns(make_model, shakespeare):
    texts = training_documents(make_reversal_dataset(3, seed=0, n_train_templates=2, n_test_templates=2).train)
    runs = [finetune_on_texts(make_model(seed=0), shakespeare[0], texts, steps=30, lr=3e-3, batch_size=4,
                              seq_len=32, seed=seed) for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[2] != runs[0] and len(runs[0]) == 30
    assert sum(runs[0][-5:]) / 5 < 0.7 * sum(runs[0][:5]) / 5, runs[0]
