"""`ExperimentConfig`: every number of the comparison experiment, loaded from a YAML recipe.

The named profiles are partial recipes in `PROFILE_RECIPES` below ("full": the seed's Pythia-70m sizes,
for a GPU; "quick": the README's ~10-minute CPU run); a YAML file in `configs/` goes over a profile
(`configs/experiment_cpu_1h.yaml`: about an hour on 2 CPU cores). Sections::

    models: [pythia, infini, multi_memory, hierarchical]
    model_overrides: {hidden_size: 512, ...}    # every model (Hugging Face field names, as create_model)
    memory_overrides: {segment_length: 128}     # only the models that have a compressive-memory layer
    data:  {corpus: wikitext-2, tokenizer: ...}  # newllm.train.config.DataConfig: one tokenizer for all models
    samples: null                               # training windows of seq_len tokens (null = the whole split)
    epochs: 1                                   # passes over those windows: same token budget for every model
    train: {seq_len: 512, batch_size: 8, lr: 6e-4, ...}   # newllm.train.config.TrainConfig fields
    eval: {...}  reversal: {...}  passkey: {...}  recall: {...}
    isolating: {enabled: true, window: 64, ...}  # the memory as the only route past the window (IsolatingConfig)

`apply_overrides` (dotted `--set` keys) and unknown-key errors work as for `newllm train` recipes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from newllm.config import dataclass_from_dict
from newllm.errors import NewLLMError
from newllm.train.config import DataConfig, TrainConfig, apply_overrides, load_yaml
from newllm.train.lct import MODES

PROFILES = ("full", "quick", "cpu", "test")


@dataclass
class ExperimentEvalConfig:
    context: int = 512  # sliding-window perplexity: tokens per window (default: the training seq_len)
    stride: int = 256  # new, scored tokens per window
    batch_size: int = 8
    max_tokens: int | None = None  # score only this prefix of each split (None: the whole split)
    splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    # loss by token position: the first position_context tokens of up to position_docs documents of
    # position_split that are at least that long, each read in one call from an empty state
    position_context: int | None = None  # None: = context
    position_docs: int = 64
    position_split: str = "test"
    position_bins: int = 16  # the position axis is reported in this many equal bins
    speed_repeats: int = 3  # inference tokens/s: the median of this many timed forward passes

    def __post_init__(self):
        for k in ("context", "stride", "batch_size", "position_docs", "position_bins", "speed_repeats"):
            if not getattr(self, k) > 0:
                raise NewLLMError(f"eval.{k} must be > 0, got {getattr(self, k)}")
        if self.stride > self.context:
            raise NewLLMError(f"eval.stride ({self.stride}) must be <= eval.context ({self.context})")


@dataclass
class ReversalConfig:
    enabled: bool = True
    n_facts: int = 100  # fictitious "name is description" facts (newllm.data.reversal)
    repeats: int = 2  # copies of every training paraphrase mixed into the training text
    seed: int = 0
    max_new_tokens: int = 16  # greedy completion length for the accuracy metric
    batch_size: int = 16


@dataclass
class PasskeyConfig:
    enabled: bool = True
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])  # prompt tokens
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # where the key sits
    n_per_cell: int = 5
    digits: int = 5
    seed: int = 0
    # optional short fine-tune on passkey prompts before the grid (on a copy: the PPLs are of the LM)
    finetune_steps: int = 0
    finetune_lengths: list[int] | None = None  # None: the grid's lengths
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 4


@dataclass
class RecallConfig:
    """Associative recall for small from-scratch models: pairs in an earlier segment than the question.
    Each model (a copy) is trained `steps` steps on the task, then scored on held-out batches."""
    enabled: bool = True
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 32
    n_pairs: int = 8  # key-value pairs in the first segment, queried in a later one
    n_keys: int = 16  # distinct keys (one-token words of the tokenizer)
    n_values: int = 16  # distinct values: chance accuracy is 1 / n_values
    eval_batches: int = 4
    seed: int = 0


def _check_factors(where: str, values: list[float]) -> None:
    if not values or any(not v > 1.0 for v in values) or len(set(values)) != len(values):
        raise NewLLMError(f"{where} must be distinct multiples of the receptive field, each > 1 (beyond it), "
                          f"got {values}")


@dataclass
class IsolatingPasskeyConfig:
    """Passkey with the needle a distance before the answer, in multiples of the receptive field."""
    enabled: bool = True
    train_distances: list[float] = field(default_factory=lambda: [1.25, 2.0])  # one fine-tuned copy per entry
    test_distances: list[float] = field(default_factory=lambda: [1.25, 2.0, 4.0])
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 8
    n_per_distance: int = 10
    digits: int = 5
    lead: int = 0  # filler tokens between the intro and the needle
    seed: int = 0

    def __post_init__(self):
        _check_factors("isolating.passkey.train_distances", self.train_distances)
        _check_factors("isolating.passkey.test_distances", self.test_distances)
        for k in ("steps", "batch_size", "n_per_distance", "digits"):
            if not getattr(self, k) >= 1:
                raise NewLLMError(f"isolating.passkey.{k} must be >= 1, got {getattr(self, k)}")
        if not self.lr > 0 or self.lead < 0:
            raise NewLLMError(f"isolating.passkey: lr must be > 0 and lead >= 0, got {self.lr}, {self.lead}")


@dataclass
class IsolatingRecallConfig:
    """Associative recall with the pairs beyond the receptive field: trained at the first distance,
    scored at each (multiples of the receptive field)."""
    enabled: bool = True
    distances: list[float] = field(default_factory=lambda: [1.25, 2.0])
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    n_pairs: int = 8
    n_keys: int = 16
    n_values: int = 16  # chance = 1 / n_values
    eval_batches: int = 4
    seed: int = 0
    # the capacity sweep (diagnosis): the trained copy scored with this many pairs stored, at the
    # training distance, against the d-associations bound of a d-dimensional linear memory
    capacity: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])

    def __post_init__(self):
        _check_factors("isolating.recall.distances", self.distances)
        for k in ("steps", "batch_size", "n_pairs", "n_keys", "n_values", "eval_batches"):
            if not getattr(self, k) >= 1:
                raise NewLLMError(f"isolating.recall.{k} must be >= 1, got {getattr(self, k)}")
        if self.n_pairs > self.n_keys or any(not 1 <= n <= self.n_keys for n in self.capacity):
            raise NewLLMError(f"isolating.recall: n_pairs {self.n_pairs} and every capacity entry {self.capacity} "
                              f"must be in [1, n_keys = {self.n_keys}] (the pairs' keys are distinct)")
        if not self.lr > 0:
            raise NewLLMError(f"isolating.recall.lr must be > 0, got {self.lr}")


@dataclass
class IsolatingPositionConfig:
    """Loss by position on long real documents past the receptive field, memory on and off."""
    enabled: bool = True
    corpus: str = "gutenberg"  # one document per book
    split: str = "test"
    length: int = 2048  # the first `length` tokens of every document at least that long
    docs: int = 32
    confidence: float = 0.95  # bootstrap interval over documents
    resamples: int = 1000
    seed: int = 0

    def __post_init__(self):
        for k in ("length", "docs", "resamples"):
            if not getattr(self, k) >= 1:
                raise NewLLMError(f"isolating.position.{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 < self.confidence < 1.0:
            raise NewLLMError(f"isolating.position.confidence must be in (0, 1), got {self.confidence}")


@dataclass
class IsolatingConfig:
    """The setting in which a memory is the only route past the attention window (docs/experiment.md):
    every softmax layer gets a window of `window` keys, the memory presets are memory everywhere or
    sit under windowed layers, and the tasks place their information past the receptive field."""
    enabled: bool = False
    models: list[str] = field(default_factory=lambda: ["pythia", "infini_all", "multi_memory_all"])  # windowed
    full_attention: list[str] = field(default_factory=lambda: ["pythia"])  # also trained without the window
    window: int = 256  # sliding_window of every softmax layer (keys each query sees, itself included)
    segment_length: int | None = None  # memory segments; None: memory_overrides.segment_length
    segments_per_window: int = 4  # k: training windows are k x segment_length tokens, gradients through k segments
    carry_windows: int = 4  # truncated BPTT: windows of one stretch of text read with the state carried (1: off)
    samples: int | None = None  # training windows; None: the main comparison's token budget
    passkey: IsolatingPasskeyConfig = field(default_factory=IsolatingPasskeyConfig)
    recall: IsolatingRecallConfig = field(default_factory=IsolatingRecallConfig)
    position: IsolatingPositionConfig = field(default_factory=IsolatingPositionConfig)

    def __post_init__(self):
        from newllm.models.presets import PRESETS

        for key in ("models", "full_attention"):
            names = getattr(self, key)
            unknown = [m for m in names if m not in PRESETS]
            if unknown or len(set(names)) != len(names):
                raise NewLLMError(f"isolating.{key}: unknown or repeated preset(s) in {names}; presets: {sorted(PRESETS)}")
        if self.enabled and not self.models:
            raise NewLLMError("isolating.models is empty; name at least one preset to train with the window")
        for k in ("window", "segments_per_window", "carry_windows"):
            if not getattr(self, k) >= 1:
                raise NewLLMError(f"isolating.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("segment_length", "samples"):
            if getattr(self, k) is not None and not getattr(self, k) >= 1:
                raise NewLLMError(f"isolating.{k} must be >= 1 or null, got {getattr(self, k)}")


@dataclass
class ExperimentConfig:
    models: list[str] = field(default_factory=lambda: ["pythia", "infini", "multi_memory", "hierarchical"])
    profile: str = "full"  # a label the report prints: full, quick (reduced size), cpu, test
    model_overrides: dict[str, Any] = field(default_factory=dict)
    memory_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=lambda: DataConfig(bpe_vocab_size=8192))
    samples: int | None = None  # training windows of train.seq_len tokens; None: the whole training split
    epochs: float = 1.0
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (not model, data, run_dir, budget)
    # peak learning rate of the memory gates (the layers' "gates" parameter group: Infini's beta, the
    # routing and expansion gates) in the models that have them; None: the base lr. A gate is a few
    # scalars, and AdamW moves a parameter by about lr per step, so a short run with the base lr
    # leaves the gates near their initial value whatever the gradient says.
    gate_lr: float | None = None
    # how recurrent presets (context_pythia) train: "lct" (Lagged Cache Training, the project's method),
    # "sequential" (the exact recurrence) or "parallel"; other presets always train in parallel
    recurrent_mode: str = "lct"
    eval: ExperimentEvalConfig = field(default_factory=ExperimentEvalConfig)
    reversal: ReversalConfig = field(default_factory=ReversalConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    recall: RecallConfig = field(default_factory=RecallConfig)
    isolating: IsolatingConfig = field(default_factory=IsolatingConfig)
    run_dir: str = "runs/experiment"
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        from newllm.models.presets import PRESETS

        if not self.models and not self.isolating.enabled:
            raise NewLLMError("experiment: models is empty; name at least one preset (or enable isolating)")
        unknown = [m for m in self.models if m not in PRESETS]
        if unknown:
            raise NewLLMError(f"experiment: unknown model(s) {unknown}; presets: {sorted(PRESETS)}")
        if len(set(self.models)) != len(self.models):
            raise NewLLMError(f"experiment: a model is listed twice in {self.models}")
        if self.profile not in PROFILES:
            raise NewLLMError(f"experiment: profile must be one of {PROFILES}, got {self.profile!r}")
        if self.samples is not None and self.samples < 1:
            raise NewLLMError(f"experiment: samples must be >= 1, got {self.samples}")
        if not self.epochs > 0:
            raise NewLLMError(f"experiment: epochs must be > 0, got {self.epochs}")
        from newllm.train.config import check_device

        check_device("experiment", self.device)
        if self.num_threads is not None and self.num_threads < 1:
            raise NewLLMError(f"experiment: num_threads must be >= 1, got {self.num_threads}")
        if self.recurrent_mode not in MODES:
            raise NewLLMError(f"experiment: recurrent_mode must be one of {MODES}, got {self.recurrent_mode!r}")
        if self.gate_lr is not None and not self.gate_lr > 0:
            raise NewLLMError(f"experiment: gate_lr must be > 0, got {self.gate_lr}")
        owned = {"model", "data", "run_dir", "max_steps", "max_tokens", "max_minutes", "seed", "device",
                 "num_threads", "progress", "eval", "mode"}
        clash = sorted(set(self.train) & owned)
        if clash:
            where = {"mode": "recurrent_mode", "max_steps": "samples x epochs", "max_tokens": "samples x epochs",
                     "max_minutes": "samples x epochs"}.get(clash[0], "the experiment's own field")
            raise NewLLMError(f"experiment: train.{clash[0]} is set by the experiment itself (from {where}); "
                              f"remove it")
        if self.isolating.enabled and self.isolating.segment_length is None \
                and not self.memory_overrides.get("segment_length"):
            raise NewLLMError("experiment: isolating needs a memory segment length: set isolating.segment_length "
                              "or memory_overrides.segment_length")
        self.train_config("pythia", 1)  # validates the train section now, not after the first model
        if self.isolating.enabled:
            for name in self.isolating.models:
                self.isolating_train_config(name, 1, full_attention=False)

    def train_config(self, model: str, n_windows: int, run_dir: str | None = None, seq_len: int | None = None,
                     carry_windows: int | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """The TrainConfig of one model: the shared `train` fields, a step budget of epochs x windows
        (`seq_len`, `carry_windows` and extra model `overrides`: the isolating setting's)."""
        batch = int(self.train.get("batch_size", TrainConfig.batch_size)) * int(self.train.get("grad_accum", 1))
        steps = max(1, math.ceil(self.epochs * n_windows / batch))
        train = dict(self.train)
        if seq_len is not None:
            train["seq_len"] = seq_len
        if carry_windows is not None:
            train["carry_windows"] = carry_windows
        if self.gate_lr is not None and has_memory_layer(model):
            groups = dict(train.get("param_groups") or {})
            groups["gates"] = {**groups.get("gates", {}), "lr": self.gate_lr}
            train["param_groups"] = groups
        if is_recurrent(model):
            train["mode"] = self.recurrent_mode
        d = {**train, "model": {"preset": model, "overrides": {**self.overrides_for(model), **(overrides or {})}},
             "data": dataclasses.asdict(self.data), "run_dir": run_dir or self.run_dir, "max_steps": steps,
             "seed": self.seed, "device": self.device, "num_threads": self.num_threads, "progress": self.progress,
             "eval": {"every": 0, "context": self.eval.context, "stride": self.eval.stride,
                      "batch_size": self.eval.batch_size, "final_splits": []}}
        return TrainConfig.from_dict(d, where="experiment train section")

    @property
    def isolating_segment_length(self) -> int:
        return int(self.isolating.segment_length or self.memory_overrides["segment_length"])

    def isolating_train_config(self, model: str, n_windows: int, run_dir: str | None = None,
                               full_attention: bool = False) -> TrainConfig:
        """An isolating model's TrainConfig: windows of k x segment_length tokens, carried across
        `carry_windows`, the window on every softmax layer (unless `full_attention`), the segment length
        on every memory layer."""
        iso, S = self.isolating, self.isolating_segment_length
        extra: dict[str, Any] = {}
        if has_memory_layer(model):
            extra["segment_length"] = S
        if not full_attention and has_windowed_layer(model):
            extra["sliding_window"] = iso.window
        return self.train_config(model, n_windows, run_dir, seq_len=iso.segments_per_window * S,
                                 carry_windows=iso.carry_windows, overrides=extra)

    def overrides_for(self, model: str) -> dict[str, Any]:
        """model_overrides, plus memory_overrides when the preset has a compressive-memory layer."""
        out = dict(self.model_overrides)
        if has_memory_layer(model):
            out.update(self.memory_overrides)
        return out

    @property
    def seq_len(self) -> int:
        return int(self.train.get("seq_len", TrainConfig.seq_len))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "experiment config") -> "ExperimentConfig":
        return dataclass_from_dict(cls, d, where)


def has_memory_layer(preset: str) -> bool:
    from newllm.models.layers import LAYER_REGISTRY
    from newllm.models.presets import PRESETS

    p = PRESETS[preset]
    return any(LAYER_REGISTRY[t].has_compressive_memory for t in [*p["first"], p["rest"]])


def has_windowed_layer(preset: str) -> bool:
    """A preset with a layer type that takes a `sliding_window` (softmax attention)."""
    import dataclasses as dc

    from newllm.models.layers import LAYER_REGISTRY
    from newllm.models.presets import PRESETS

    p = PRESETS[preset]
    return any("sliding_window" in {f.name for f in dc.fields(LAYER_REGISTRY[t].config_class)}
               for t in [*p["first"], p["rest"]])


def is_recurrent(preset: str) -> bool:
    """A preset with context feedback (context_pythia): trained with `recurrent_mode`."""
    from newllm.models.presets import PRESETS

    return bool(PRESETS[preset].get("context_feedback"))


def load_experiment_config(path=None, overrides: list[str] = ()) -> ExperimentConfig:
    d = load_yaml(path) if path is not None else {}
    d = apply_overrides(d, list(overrides))
    return ExperimentConfig.from_dict(d, where=str(path) if path is not None else "--set")


#: named profiles: partial recipes applied under the file recipe and --set (`--quick` = "quick").
#: "full": the seed's Pythia-70m sizes (the preset's own, no model overrides), meant for a GPU.
PROFILE_RECIPES: dict[str, dict[str, Any]] = {
    "full": {
        "data": {"tokenizer": "gpt-neox-20b"},  # Pythia's own tokenizer (../shared/tokenizers/gpt-neox-20b)
        "memory_overrides": {"segment_length": 256},
        "epochs": 4, "gate_lr": 6.0e-3,
        "train": {"seq_len": 1024, "batch_size": 16, "lr": 6.0e-4, "min_lr": 6.0e-5, "warmup_steps": 200,
                  "checkpoint_every": 500},
        "eval": {"context": 1024, "stride": 512, "batch_size": 8, "position_context": 4096, "position_docs": 64},
        "passkey": {"lengths": [1024, 2048, 4096, 8192], "finetune_steps": 200, "finetune_lengths": [1024]},
        "recall": {"steps": 500},
    },
    # ~10 minutes on 2 CPU cores: a 2-layer d=128 model (the memory presets: one memory layer + one
    # Pythia layer), a 4096-token BPE, ~0.8M training tokens, short evaluations. Real text throughout.
    "quick": {
        "profile": "quick",
        "model_overrides": {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512,
                            "num_hidden_layers": 2},
        "memory_overrides": {"segment_length": 64},
        "data": {"bpe_vocab_size": 4096},
        "samples": 3072, "epochs": 1, "gate_lr": 2.0e-2,
        "train": {"seq_len": 256, "batch_size": 16, "lr": 2.0e-3, "min_lr": 2.0e-4, "warmup_steps": 20,
                  "checkpoint_every": 50, "log_every": 5},
        "eval": {"context": 256, "stride": 128, "batch_size": 16, "max_tokens": 16384, "position_context": 512,
                 "position_docs": 16, "position_bins": 16},
        "reversal": {"n_facts": 30, "repeats": 3},
        "passkey": {"lengths": [256, 512], "depths": [0.0, 0.5, 1.0], "n_per_cell": 2, "finetune_steps": 20,
                    "finetune_lengths": [256], "finetune_lr": 1.0e-3},
        "recall": {"steps": 60, "batch_size": 16, "n_pairs": 8},
        # the isolating setting at the same size: every softmax layer windowed to 64 keys (receptive field
        # 2 x 63 = 126, as the memory-everywhere stacks' 2 x (64 - 1)), tasks 1.5x-6x that far back
        "isolating": {"enabled": True, "models": ["pythia", "infini_all", "multi_memory_all"],
                      "full_attention": ["pythia"], "window": 64, "segments_per_window": 4, "carry_windows": 2,
                      "samples": 512,
                      "passkey": {"train_distances": [1.5], "test_distances": [1.5, 3.0, 6.0], "steps": 30,
                                  "batch_size": 8, "n_per_distance": 8, "lr": 1.0e-3},
                      "recall": {"distances": [1.5, 3.0], "steps": 30, "batch_size": 16, "n_pairs": 8,
                                 "eval_batches": 2},
                      "position": {"corpus": "gutenberg", "split": "test", "length": 1024, "docs": 8}},
        "run_dir": "runs/experiment_quick",
    },
}


def profile_config(profile: str, path=None, overrides: list[str] = ()) -> ExperimentConfig:
    """A profile's recipe, then the YAML file at `path` (if any) over it, then `overrides` (dotted --set)."""
    import copy

    if profile not in PROFILE_RECIPES:
        raise NewLLMError(f"unknown experiment profile {profile!r}; known: {sorted(PROFILE_RECIPES)}")
    d = copy.deepcopy(PROFILE_RECIPES[profile])
    if path is not None:
        _merge(d, load_yaml(path))
    d = apply_overrides(d, list(overrides))
    return ExperimentConfig.from_dict(d, where=str(path) if path is not None else f"profile {profile}")


def _merge(base: dict, top: dict) -> None:
    data = top.get("data")
    if isinstance(data, dict) and isinstance(base.get("data"), dict) and ({"tokenizer", "bpe_vocab_size"} & set(data)):
        base["data"].pop("tokenizer", None)  # a recipe that names its tokenizer replaces the profile's choice
        base["data"].pop("bpe_vocab_size", None)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("model_overrides", "memory_overrides"):
            _merge(base[k], v)
        else:
            base[k] = v
