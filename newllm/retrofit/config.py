"""`RetrofitConfig`: a retrofit recipe (`configs/retrofit_*.yaml`), read by `newllm retrofit`.

    model:   {path: SmolLM2-135M-Instruct.Q4_1.gguf}         # a GGUF file or a Hugging Face folder
    surgery: {layers: [15], kind: window_memory, options: {window: 64, attention_sinks: 4}}
    stages:
      - {name: transfer, kind: transfer, steps: 150, lr: 1.0e-2, train_tokens: 8192, seq_len: 1024}
      - {name: lora, kind: lora, steps: 100, lr: 1.0e-4, kl_weight: 1.0}
    eval:    {max_tokens: 4000, context: 1024, stride: 512}
    run_dir: runs/retrofit_smollm2

Stage kinds (newllm/retrofit/stages.py):

* `transfer`: each replaced layer is trained on the TEACHER's input to it (teacher forcing), to
  match the teacher's output of that layer (`target: layer`) or of its mixer (`target: mixer`,
  LoLCATs' attention transfer), with `loss: mse | cosine | huber` x `loss_scale`. Only the student's
  replaced layers run; the teacher's activations are cached per training window.
  `train: new` trains only what the new mixer adds to the copied attention (feature maps, window
  factors, gates); `train: layer` trains the whole replaced layer (the seed's distillation).
* `new_layers`: the language-modelling loss through the whole model, only the replaced layers
  trainable (`train: new | layer` as above, plus an adapter's alpha).
* `full`: every parameter, the replaced layers at `lr x replaced_lr_scale`, the others at
  `lr x other_lr_scale` (seed 003: 2.0 and 0.5).
* `lora`: LoRA (PEFT, `lora.target_modules`) on the model; with `train: new` the replaced layers'
  new parameters train too.

`new_layers`, `full` and `lora` may add `kl_weight x KL(teacher || student)` on the next-token
distributions (temperature `kl_temperature`) to `ce_weight x CE`.

Every field is type- and range-checked when the recipe is read, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from newllm.config import dataclass_from_dict
from newllm.errors import NewLLMError
from newllm.train.config import AMP_MODES, apply_overrides, load_yaml

KINDS = ("infini", "multi_memory", "hierarchical", "window_memory")
STAGE_KINDS = ("transfer", "new_layers", "full", "lora")
LOSSES = ("mse", "cosine", "huber")
TARGETS = ("mixer", "layer")
TRAIN_WHAT = ("new", "layer")


@dataclass
class ModelSource:
    path: str = "SmolLM2-135M-Instruct.Q4_1.gguf"  # relative: the current folder, else <data dir>/models/
    tokenizer: str | None = None  # None: the model's own (a GGUF's vocabulary, a folder's tokenizer.json)


@dataclass
class SurgerySpec:
    layers: list[int] | str = field(default_factory=lambda: [0])  # indices, or "every-other" (1, 3, 5, ...)
    kind: str = "window_memory"  # window_memory keeps RoPE (the layer's own attention over the window);
    # infini / multi_memory / hierarchical are NoPE (the seed's Infini layer: segment-local attention + memory)
    adapter: bool = False  # wrap as ParallelAdapter: original(x) + alpha * (new(x) - x)
    alpha_init: float = 0.0  # the seed's 0: the adapted model is the original at step 0
    init: str = "copy"  # "copy": Q/K/V/O, MLP and norms from the layer replaced; "random": the new layer's own init
    options: dict[str, Any] = field(default_factory=dict)  # the memory layer's config fields (window, ...)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise NewLLMError(f"surgery.kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.layers, str):
            if self.layers != "every-other":
                raise NewLLMError(f"surgery.layers must be a list of layer indices or 'every-other', got "
                                  f"{self.layers!r}")
        elif not isinstance(self.layers, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                       for i in self.layers):
            raise NewLLMError(f"surgery.layers must be a list of layer indices >= 0 ([]: none, the control run), "
                              f"got {self.layers}")
        elif len(set(self.layers)) != len(self.layers):
            raise NewLLMError(f"surgery.layers has repeated indices: {self.layers}")
        _finite("surgery", alpha_init=self.alpha_init)
        if self.init not in ("copy", "random"):
            raise NewLLMError(f"surgery.init must be 'copy' or 'random', got {self.init!r}")

    def resolve_layers(self, n: int) -> list[int]:
        layers = list(range(1, n, 2)) if self.layers == "every-other" else list(self.layers)
        bad = [i for i in layers if i >= n]
        if bad:
            raise NewLLMError(f"surgery.layers {bad} outside the model's 0..{n - 1}")
        return layers


@dataclass
class LoRASpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        _positive("lora", r=self.r, alpha=self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise NewLLMError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise NewLLMError(f"lora.target_modules must be a non-empty list of module names, got "
                              f"{self.target_modules}")


@dataclass
class StageSpec:
    name: str = "stage"
    kind: str = "transfer"
    steps: int = 100  # optimizer steps
    lr: float = 1e-3
    min_lr: float | None = None  # cosine floor; None = lr (a constant lr after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    batch_size: int = 1
    seq_len: int = 512
    train_tokens: int | None = None  # train on the first N tokens of the training split (None: all of it)
    train: str = "new"  # transfer / new_layers / lora: "new" (what the new mixer adds) or "layer" (all of it)
    target: str = "mixer"  # transfer: match the mixer's output or the whole layer's output
    loss: str = "mse"  # transfer: mse | cosine | huber
    loss_scale: float = 1.0  # transfer: the loss is multiplied by this (LoLCATs: 1000 on per-head outputs)
    huber_delta: float = 1.0
    ce_weight: float = 1.0  # new_layers / full / lora
    kl_weight: float = 0.0  # new_layers / full / lora: + kl_weight * KL(teacher || student)
    kl_temperature: float = 1.0
    replaced_lr_scale: float = 1.0  # full: the replaced layers' lr = lr x this
    other_lr_scale: float = 1.0  # full: every other parameter's lr = lr x this
    gates_lr: float | None = None  # the layers' `gates` group (beta, window factors, adapter alpha); None = lr
    lora: LoRASpec = field(default_factory=LoRASpec)
    checkpoint_every: int = 50
    log_every: int = 5

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise NewLLMError(f"stages: name must be letters, digits, '-' or '_', got {self.name!r}")
        w = f"stage {self.name}"
        for key, allowed in (("kind", STAGE_KINDS), ("train", TRAIN_WHAT), ("target", TARGETS), ("loss", LOSSES)):
            if getattr(self, key) not in allowed:
                raise NewLLMError(f"{w}: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        _positive(w, steps=self.steps, lr=self.lr, batch_size=self.batch_size, seq_len=self.seq_len,
                  loss_scale=self.loss_scale, huber_delta=self.huber_delta, kl_temperature=self.kl_temperature,
                  replaced_lr_scale=self.replaced_lr_scale, other_lr_scale=self.other_lr_scale,
                  log_every=self.log_every)
        _nonneg(w, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, ce_weight=self.ce_weight,
                kl_weight=self.kl_weight, checkpoint_every=self.checkpoint_every)
        for key in ("min_lr", "grad_clip", "gates_lr", "train_tokens"):
            if getattr(self, key) is not None:
                _positive(w, **{key: getattr(self, key)})
        if self.min_lr is not None and self.min_lr > self.lr:
            raise NewLLMError(f"{w}: min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.kind != "transfer" and self.ce_weight == 0 and self.kl_weight == 0:
            raise NewLLMError(f"{w}: ce_weight and kl_weight are both 0: nothing to train on")
        if self.train_tokens is not None and self.train_tokens < self.seq_len + 1:
            raise NewLLMError(f"{w}: train_tokens ({self.train_tokens}) must be > seq_len ({self.seq_len})")


@dataclass
class RetrofitEval:
    corpus: str = "wikitext-2"
    split: str = "valid"
    max_tokens: int | None = 4000  # the first N tokens of the split (None: all of it)
    context: int = 1024
    stride: int = 512
    batch_size: int = 1
    stats_tokens: int = 256  # the window on which per-layer output statistics are compared
    prompts: list[str] = field(default_factory=lambda: ["The capital of France is", "1 + 1 =", "Hello, my name is"])
    max_new_tokens: int = 16
    memory_off: bool = True  # also score the retrofitted model with its memories switched off
    after_surgery: bool = True  # also run the checklist right after the swap, before any training
    state_tokens: list[int] = field(default_factory=list)  # measure the held state after these many tokens

    def __post_init__(self):
        _positive("eval", context=self.context, stride=self.stride, batch_size=self.batch_size,
                  stats_tokens=self.stats_tokens, max_new_tokens=self.max_new_tokens)
        if self.max_tokens is not None:
            _positive("eval", max_tokens=self.max_tokens)
        if self.stride > self.context:
            raise NewLLMError(f"eval.stride ({self.stride}) must be <= eval.context ({self.context})")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in self.state_tokens):
            raise NewLLMError(f"eval.state_tokens must be positive token counts, got {self.state_tokens}")
        if not all(isinstance(p, str) and p for p in self.prompts):
            raise NewLLMError("eval.prompts must be non-empty strings")


@dataclass
class RetrofitConfig:
    model: ModelSource = field(default_factory=ModelSource)
    surgery: SurgerySpec = field(default_factory=SurgerySpec)
    stages: list[StageSpec] = field(default_factory=list)
    eval: RetrofitEval = field(default_factory=RetrofitEval)
    corpus: str = "wikitext-2"  # training text (its train split)
    data_dir: str | None = None  # None: --data-dir, $NEWLLM_DATA_DIR, or ../shared beside the checkout
    cache_dir: str | None = None
    run_dir: str = "runs/retrofit"
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # "bf16": autocast in every stage (the memories stay fp32)
    num_threads: int | None = None
    progress: bool = True
    on_nonfinite: str = "skip"  # a non-finite step is skipped with a warning and counted (seed 000)
    max_nonfinite_skips: int = 10

    def __post_init__(self):
        if not self.stages:
            raise NewLLMError("stages: a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise NewLLMError(f"stages: names must differ, got {names}")
        if self.amp not in AMP_MODES:
            raise NewLLMError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise NewLLMError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        _nonneg("retrofit", max_nonfinite_skips=self.max_nonfinite_skips, seed=self.seed)
        if self.num_threads is not None:
            _positive("retrofit", num_threads=self.num_threads)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "retrofit config") -> "RetrofitConfig":
        if isinstance(d.get("stages"), list):  # each stage is checked as a StageSpec, naming its index
            d = {**d, "stages": [_stage(s, where, i) for i, s in enumerate(d["stages"])]}
        return dataclass_from_dict(cls, d, where)


def _stage(s, where: str, i: int) -> StageSpec:
    if isinstance(s, StageSpec):
        return s
    if not isinstance(s, dict):
        raise NewLLMError(f"{where}: stages[{i}] must be a mapping, got {type(s).__name__}")
    return dataclass_from_dict(StageSpec, s, f"{where}: stages[{i}]")


def load_retrofit_config(path=None, overrides: list[str] = ()) -> RetrofitConfig:
    """A recipe from YAML `path` with `--set k=v` overrides (`stages.0.lr=1e-3` sets a stage's field)."""
    d = load_yaml(path) if path is not None else {}
    n = len(d["stages"]) if isinstance(d.get("stages"), list) else 0
    d = apply_overrides(_stages_as_mapping(d), list(overrides))
    return RetrofitConfig.from_dict(_stages_as_list(d, n), where=str(path) if path is not None else "--set")


def _stages_as_mapping(d: dict) -> dict:
    """stages as {"0": ..., "1": ...} so that dotted --set keys can reach into a stage."""
    if isinstance(d.get("stages"), list):
        return {**d, "stages": {str(i): s for i, s in enumerate(d["stages"])}}
    return d


def _stages_as_list(d: dict, n: int) -> dict:
    st = d.get("stages")
    if isinstance(st, dict):
        extra = sorted(set(map(str, st)) - {str(i) for i in range(n)})
        if extra:
            raise NewLLMError(f"--set stages.N: N must index an existing stage 0..{n - 1}, got {extra}")
        d = {**d, "stages": [st[str(i)] for i in range(n)]}
    return d


def resolve_model_path(path: str, data_dir: Path) -> Path:
    """`path` as given if it exists, else under <data dir>/models/ (where the shared models live)."""
    p = Path(path)
    if p.exists():
        return p
    q = data_dir / "models" / p
    if not p.is_absolute() and q.exists():
        return q
    raise NewLLMError(f"model.path {path!r}: no such file or folder (also looked in {data_dir / 'models'})")


def _finite(owner, **values):
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise NewLLMError(f"{owner}: {k} must be a finite number, got {v!r}")


def _positive(owner, **values):
    for k, v in values.items():
        _finite(owner, **{k: v})
        if not v > 0:
            raise NewLLMError(f"{owner}: {k} must be > 0, got {v}")


def _nonneg(owner, **values):
    for k, v in values.items():
        _finite(owner, **{k: v})
        if v < 0:
            raise NewLLMError(f"{owner}: {k} must be >= 0, got {v}")
