"""The conformance suite: the layer contract, checked for every registered layer type and every preset.

Each case is a tiny model: a 2-layer stack of one registered layer type (at its `tiny_config()`),
a memory layer in the Llama block, or a preset at test sizes. For each one:

* one call == any split with the state carried (halves, ragged, inside segments, 1 token at a
  time), with full attention, with a sliding window wherever a layer has one, and with the window
  plus attention sinks, to 1e-5 (fp32);
* causality: changing tokens after t never changes the logits at <= t;
* a state file round trip into a fresh process (save_model + save_memory_state here, load and
  continue in a new Python process) gives the same logits as continuing here;
* a state taken at batch 1 broadcasts to any batch;
* gradients reach every parameter;
* fp32 and bf16 forwards are finite;
* the given state is never changed in place (values and autograd version counters);
* the declared capabilities answer: init_state equals no state, tokens_absorbed counts the tokens,
  check_state refuses a foreign state with one line.

`ToyEMALayer` below is a layer type defined only in this file: one `@register_layer` line and it
runs the whole suite, builds with `create_model("toy_ema", ...)`, goes through the experiment's
probes and `newllm memory save`, without any other file knowing it (docs/architecture.md walks
through it).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

from newllm import NewLLMError, TransformerLM, create_model
from newllm.models.layers import LAYER_REGISTRY, BaseLayer, StateField, attention, register_layer
from newllm.models.context import build_model
from newllm.models.layers.base import resolve_config
from newllm.models.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- a toy layer type
@dataclass
class ToyEMAConfig:
    hidden_size: int = 32
    decay_init: float = 1.0  # sigmoid(1) = 0.73 of the running mean is kept per token


class ToyEMAState(NamedTuple):
    mean: torch.Tensor  # (B, d) fp32: the running mean h_t, a fixed-size "memory"
    tokens: torch.Tensor  # () int64: tokens absorbed


class ToyWriteGate(nn.Linear):
    def forward(self, x):  # a per-token gate in [0, 1]: how much of x_t is written into the mean
        return torch.sigmoid(super().forward(x).float())


@register_layer("toy_ema")  # the one line that makes it a newllm layer type
class ToyEMALayer(BaseLayer):
    """y_t = x_t + W h_{t-1},  h_t = a h_{t-1} + (1 - a) g_t x_t  (a = sigmoid(alpha) per channel,
    g_t a per-token write gate; each token reads the mean of the tokens before it, h_{-1} = 0).
    Memory off: y_t = x_t + W 0, nothing written."""

    config_class = ToyEMAConfig
    state_type = ToyEMAState
    has_compressive_memory = True
    memory_segment_length = 1  # every token is written at once

    def __init__(self, *args, config: ToyEMAConfig | None = None, **kwargs):
        config = resolve_config(ToyEMAConfig, config, args, kwargs, ("hidden_size",))
        super().__init__(config)
        d = config.hidden_size
        self.alpha = nn.Parameter(torch.full((d,), config.decay_init))
        self.write = ToyWriteGate(d, 1)
        self.out = nn.Linear(d, d)
        self.enabled = True

    @classmethod
    def tiny_config(cls):
        return ToyEMAConfig(hidden_size=32)

    def state_spec(self):
        return {"mean": StateField((self.config.hidden_size,), torch.float32),
                "tokens": StateField((), torch.long, batched=False)}

    def tokens_absorbed(self, state):
        return int(state.tokens)

    @property
    def memory_enabled(self):
        return self.enabled

    @memory_enabled.setter
    def memory_enabled(self, enabled):
        self.enabled = bool(enabled)

    def gates(self):
        return {"decay": torch.sigmoid(self.alpha.detach().float())}

    def token_gates(self):
        return {"write": self.write}

    def param_groups(self):
        return {"gates": [self.alpha]}

    def forward(self, x, state=None):
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        self.check_state(state, x.shape[0])
        a, g = torch.sigmoid(self.alpha), self.write(x)  # (d,), (B, T, 1)
        h, hs = state.mean, []
        for t in range(x.shape[1]):
            hs.append(h)  # read before write: token t sees tokens < t
            h = a * h + (1 - a) * g[:, t] * x[:, t].float()
        mem = torch.stack(hs, 1).to(x.dtype) if self.enabled else torch.zeros_like(x)
        return x + self.out(mem), ToyEMAState(h if self.enabled else state.mean, state.tokens + x.shape[1])


# ---------------------------------------------------------------------------- the cases
V = 97
TINY = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3)
PRESET_EXTRA = {"llama": dict(num_key_value_heads=2), "infini": dict(segment_length=8),
                "multi_memory": dict(segment_length=6, num_memories=3),
                "hierarchical": dict(segment_length=6, num_memories=3),
                "llama_infini": dict(num_key_value_heads=2, segment_length=8),
                "infini_all": dict(segment_length=8), "multi_memory_all": dict(segment_length=6, num_memories=3)}


def stack_of(layer_type: str, **options):
    """A 2-layer model of one registered type at its tiny_config (plus options)."""
    cls = LAYER_REGISTRY[layer_type]

    def build():
        cfg = cls.tiny_config()
        layers = [cls(config=type(cfg)(**{**cfg.__dict__, **options})) for _ in range(2)]
        return TransformerLM(layers=layers, vocab_size=V, max_position_embeddings=None)
    return build


LLAMA_BLOCK = dict(block="llama", num_key_value_heads=2, attention_bias=False, mlp_bias=False, hidden_act="silu")


def preset(name: str):
    return lambda: create_model(name, **{**TINY, **PRESET_EXTRA.get(name, {})})


CASES = {f"layer-{t}": stack_of(t) for t in sorted(LAYER_REGISTRY)}
CASES.update({f"layer-{t}-llama-block-gqa": stack_of(t, **LLAMA_BLOCK)
              for t in ("infini", "multi_memory", "hierarchical")})
CASES.update({f"preset-{p}": preset(p) for p in sorted(PRESETS)})


def build(case: str, window: int | None = None, sinks: int = 0):
    torch.manual_seed(0)
    model = CASES[case]()
    if window is not None:  # a sliding window (and attention sinks) on every layer that has one
        layers = []
        for layer in model.layers:
            spec = layer.spec()
            if "sliding_window" in spec:
                spec["sliding_window"] = window
            if sinks and "attention_sinks" in spec:
                spec["attention_sinks"] = sinks
            layers.append(spec)
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(model.config, layers=layers))
    return model.eval()


def has_window(case: str) -> bool:
    return any("sliding_window" in layer.spec() for layer in build(case).layers)


def ids_(B: int = 2, T: int = 41, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


SPLITS = {"halves": [20], "ragged": [1, 2, 7, 19, 30], "inside-segments": [3, 11, 13, 29],
          "one-token-steps": list(range(1, 41))}


def run_split(model, ids, cuts, state=None):
    outs, bounds = [], [0, *cuts, ids.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = model(ids[:, a:b], state=state)
        state = out.state
        outs.append(out.logits)
    return torch.cat(outs, dim=1), state


WINDOWS = {"full": (None, 0), "window6": (6, 0), "window6-sinks2": (6, 2)}
WINDOW_CASES = [(c, w) for c in CASES for w in WINDOWS if w == "full" or has_window(c)]


# ---------------------------------------------------------------------------- the suite
@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("case,window", WINDOW_CASES, ids=[f"{c}-{w}" for c, w in WINDOW_CASES])
def test_one_call_equals_any_split(case, window, split):
    model, ids = build(case, *WINDOWS[window]), ids_()
    with torch.no_grad():
        full = model(ids).logits
        pieces, _ = run_split(model, ids, SPLITS[split])
    torch.testing.assert_close(pieces, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_causal(case):
    model = build(case)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (1, 40), generator=g)
    with torch.no_grad():
        base = model(ids).logits
        for t in (0, 13, 38):
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(0, V, (1, 39 - t), generator=g)
            out = model(changed).logits
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-4  # the change is visible after t


@pytest.mark.parametrize("case", CASES)
def test_batch1_state_broadcasts(case):
    model = build(case)
    prefix, cont = ids_(1, 17, seed=3), ids_(3, 9, seed=4)
    with torch.no_grad():
        state = model(prefix).state
        batched = model(cont, state=state).logits
        for b in range(3):
            torch.testing.assert_close(batched[b:b + 1], model(cont[b:b + 1], state=state).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_every_parameter(case):
    model = build(case).train()
    ids = ids_(2, 41)
    state = model(ids[:, :13]).state  # the continuation reads a state made with the graph kept
    out = model(ids[:, 13:], labels=ids[:, 13:], state=state)
    (out.loss + model(ids[:, :13], labels=ids[:, :13]).loss).backward()
    none = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not none, f"no gradient reaches {none}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_forward_is_finite(case, dtype):
    model = build(case).to(dtype)
    with torch.no_grad():
        out = model(ids_(2, 41))
        more = model(ids_(2, 5, seed=5), state=out.state)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all() and torch.isfinite(more.logits).all()


@pytest.mark.parametrize("case", CASES)
def test_given_state_is_never_changed_in_place(case):
    model = build(case)
    with torch.no_grad():
        state = model(ids_(2, 23)).state
        before = [[(t.clone(), t._version) for t in s] for s in state if s is not None]
        model(ids_(2, 11, seed=6), state=state)
        model(ids_(2, 1, seed=7), state=state)
    after = [[(t, t._version) for t in s] for s in state if s is not None]
    for s0, s1 in zip(before, after):
        for (t0, v0), (t1, v1) in zip(s0, s1):
            # a KV cache that is a view of a preallocated buffer shares the buffer's version counter:
            # a later call wrote after the view (never inside it), which bumps the count
            in_buffer = t1._base is not None and id(t1._base) in attention._FILLED
            assert (v0 == v1 or in_buffer) and torch.equal(t0, t1)


@pytest.mark.parametrize("case", CASES)
def test_declared_capabilities_answer(case):
    model = build(case)
    ids = ids_(2, 23)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, state=model.init_state(2)).logits, model(ids).logits, atol=1e-6, rtol=0)
        state = model(ids).state
    for layer, s in zip(model.layers, state):
        assert type(s) is layer.state_type
        layer.check_state(s, 2)  # its own state passes
        tokens = layer.tokens_absorbed(s)
        assert tokens is None or tokens == 23
        assert isinstance(layer.uses_positions, bool) and isinstance(layer.gates(), dict)
        assert all(p.requires_grad for ps in layer.param_groups().values() for p in ps)
        if layer.has_compressive_memory or layer.memory_enabled:  # a memory, switched on (an adapter's new layer)
            assert layer.memory_segment_length >= 1 and layer.memory_enabled
        else:
            with pytest.raises(NewLLMError, match="has no memory"):
                layer.memory_enabled = False
    good = model.layers[0].init_state(2)
    bad = good._replace(**{good._fields[0]: torch.zeros(2, 3, 5, 7, 11, 13)})  # a tensor of the wrong rank
    with pytest.raises(NewLLMError, match=f"tensor '{good._fields[0]}' has shape") as e:
        model.layers[0].check_state(bad, 2)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- a fresh process
FRESH = """
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
import tests.models.test_conformance  # registers toy_ema, as a user's module registers its layer
from newllm import load_memory_state
from newllm.checkpoints.native import load_model
for d in sorted(Path(sys.argv[1]).iterdir()):
    model = load_model(d / "model").eval()
    model.set_memory_state(load_memory_state(d / "state.safetensors"))
    with torch.no_grad():
        out = model(load_file(str(d / "ids.safetensors"))["ids"]).logits
    save_file({"logits": out}, str(d / "got.safetensors"))
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    """Every case's model and state after a prefix, written here, continued in one new process."""
    from safetensors.torch import save_file

    from newllm import save_memory_state
    from newllm.checkpoints.native import save_model

    root = tmp_path_factory.mktemp("fresh")
    expected = {}
    for i, case in enumerate(CASES):
        model, d = build(case), root / f"{i:02d}"
        prefix, cont = ids_(1, 19, seed=8), ids_(1, 9, seed=9)
        with torch.no_grad():
            model.reset_memory()
            model(prefix, update_memory=True)
            expected[case] = (d, model(cont).logits)
        save_model(model, d / "model")
        save_memory_state(model.get_memory_state(), d / "state.safetensors")
        save_file({"ids": cont}, str(d / "ids.safetensors"))
    res = subprocess.run([sys.executable, "-c", FRESH, str(root)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return expected


@pytest.mark.parametrize("case", CASES)
def test_state_file_round_trip_into_a_fresh_process(case, fresh_process):
    from safetensors.torch import load_file

    d, want = fresh_process[case]
    torch.testing.assert_close(load_file(str(d / "got.safetensors"))["logits"], want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- the toy, end to end
def test_toy_layer_builds_like_a_preset_and_runs_the_experiment_probes(shared_dir):
    from newllm.checkpoints import load_tokenizer
    from newllm.experiment.probes import loss_by_position

    torch.manual_seed(0)
    model = create_model("toy_ema", vocab_size=50304, num_hidden_layers=3).eval()
    assert [layer.layer_type for layer in model.layers] == ["toy_ema"] * 3
    tok = load_tokenizer(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
    text = (shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:20000]
    ids = torch.tensor(tok.encode(text))
    docs = [ids[i * 64:(i + 1) * 64].numpy() for i in range(3)]
    res = loss_by_position(model, docs, bins=4)
    assert res["segment_length"] == 1 and len(res["loss"]) == 63
    assert res["loss"][0] == pytest.approx(res["loss_memory_off"][0], abs=1e-5)  # nothing absorbed yet
    assert max(abs(a - b) for a, b in zip(res["loss"][1:], res["loss_memory_off"][1:])) > 1e-4
    gates = res["gates"]["L0"]
    assert len(gates["gates"]["decay"]) == 32 and gates["token_gates"]["write"]["n"] == 3 * 64
    assert all(layer.memory_enabled for layer in model.layers)  # switched back on after the ablation


def test_toy_layer_through_newllm_memory_save(tmp_path, shared_dir, capsys):
    from newllm import load_memory_state
    from newllm.cli import main

    text = tmp_path / "book.txt"
    text.write_text((shared_dir / "data" / "tinyshakespeare" / "input.txt").read_text()[:3000])
    out = tmp_path / "mem.safetensors"
    tokenizer = shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    assert main(["memory", "save", "toy_ema", "--text", str(text), "--tokenizer", str(tokenizer), "--out", str(out),
                 "--chunk", "100"]) == 0
    state = load_memory_state(out)
    assert state.layer_types == ["toy_ema", "toy_ema"] and all(e.compressive for e in state.entries)
    assert state.tokens_absorbed == json.loads(json.dumps(state.header()))["tokens_absorbed"] > 100
