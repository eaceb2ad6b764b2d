"""`TrainConfig`: every number the training loop uses, loaded from a YAML recipe in `configs/`.

A recipe is a nested mapping whose sections are the nested dataclasses below::

    model: {preset: pythia, overrides: {hidden_size: 256, num_hidden_layers: 4}}
    data:  {corpus: wikitext-2, bpe_vocab_size: 8192}
    eval:  {every: 500, context: 256, stride: 128}
    seq_len: 256
    lr: 1.0e-3
    ...

`apply_overrides(d, ["eval.every=100", "lr=3e-4"])` sets dotted keys; values are parsed as YAML
scalars (`1e-3` -> float, `null` -> None, `[0.9, 0.95]` -> list). Unknown keys are errors that name
the key and the file, so a typo never trains with a default silently.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from newllm.config import dataclass_from_dict
from newllm.errors import NewLLMError
from newllm.train.lct import MODES, LCTConfig

AMP_MODES = ("none", "bf16", "fp16", "auto")
#: what `device` may say: auto, cpu, cuda, cuda:N, mps (checked when the recipe is read, not at the first step)
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
NONFINITE_POLICIES = ("stop", "skip")
#: how the model is spread over the processes when torchrun starts more than one (newllm/train/distributed.py)
DISTRIBUTED_KINDS = ("ddp", "fsdp")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class ModelSpec:
    preset: str = "pythia"  # a name in newllm.models.presets.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # Hugging Face field names, as create_model takes
    # vocab_size is taken from the tokenizer unless overrides set it (then it must be >= the tokenizer's)


@dataclass
class DataConfig:
    corpus: str = "wikitext-2"  # a named corpus or a text file / folder (newllm.data.corpora)
    data_dir: str | None = None  # None: --data-dir, $NEWLLM_DATA_DIR, or ../shared beside the checkout
    cache_dir: str | None = None  # token cache; None: $NEWLLM_CACHE_DIR or ~/.cache/newllm
    tokenizer: str | None = None  # tokenizer.json (or folder / .gguf); None: train a BPE (bpe_vocab_size)
    bpe_vocab_size: int | None = None  # train a byte-level BPE of this size on the training split
    bpe_min_frequency: int = 2
    train_split: str = "train"
    valid_split: str = "valid"

    def __post_init__(self):
        if (self.tokenizer is None) == (self.bpe_vocab_size is None):
            raise NewLLMError("data: give exactly one of data.tokenizer (a tokenizer.json) or data.bpe_vocab_size "
                              "(train a BPE on the training split)")
        if self.bpe_vocab_size is not None and self.bpe_vocab_size < 257:
            raise NewLLMError(f"data.bpe_vocab_size must be >= 257 (256 bytes + EOS), got {self.bpe_vocab_size}")


@dataclass
class EvalConfig:
    every: int = 500  # optimizer steps between validations; 0 = only at the end
    context: int = 2048  # sliding-window perplexity: tokens each window sees
    stride: int = 512  # new (scored) tokens per window
    batch_size: int = 8
    max_tokens: int | None = 65536  # periodic validation scores this prefix of the valid split (None = all)
    final_splits: list[str] = field(default_factory=lambda: ["valid", "test"])  # scored in full at the end

    def __post_init__(self):
        _check_nonneg("eval", every=self.every)
        _check_pos("eval", context=self.context, stride=self.stride, batch_size=self.batch_size)
        if self.stride > self.context:
            raise NewLLMError(f"eval.stride ({self.stride}) must be <= eval.context ({self.context})")
        if self.max_tokens is not None:
            _check_pos("eval", max_tokens=self.max_tokens)


@dataclass
class WandbConfig:
    """The optional Weights & Biases backend of the run's metrics (beside metrics.jsonl and TensorBoard);
    `wandb` is imported only when `enabled`. The run id is kept in every checkpoint, so a resume
    continues the same W&B run."""

    enabled: bool = False
    project: str = "newllm"
    entity: str | None = None  # None: the API key's default entity
    name: str | None = None  # None: the run folder's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # "online" | "offline" | "disabled"; None: $WANDB_MODE, else online

    def __post_init__(self):
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise NewLLMError(f"wandb: mode must be one of {WANDB_MODES} or null, got {self.mode!r}")
        if not self.project.strip():
            raise NewLLMError("wandb: project must be a non-empty name")


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=lambda: DataConfig(bpe_vocab_size=8192))
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/default"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    num_threads: int | None = None  # torch intra-op threads on CPU; None = torch's default
    seed: int = 0
    # batch: one optimizer step sees batch_size * grad_accum windows of seq_len predicted tokens
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    # budget: training stops at the first one reached; the cosine runs over the same fraction
    max_steps: int | None = None
    max_tokens: int | None = None  # predicted tokens
    max_minutes: float | None = None  # wall clock of training (evaluation and checkpoints excluded)
    # optimizer (AdamW) and schedule (linear warmup, then cosine from lr to min_lr)
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    # groups requested by layers (BaseLayer.param_groups()): {name: {lr: ..., weight_decay: ...}};
    # a requested group missing here gets the base lr and no weight decay
    param_groups: dict[str, dict[str, float]] = field(default_factory=dict)
    amp: str = "none"  # "none" | "bf16" (autocast) | "fp16" (autocast + GradScaler) | "auto" (bf16 where native)
    # positions per chunk of the LM-head loss (newllm.models.ops.loss: logits, softmax and their gradient a chunk at
    # a time, never the whole (B, T, V) logits); 0 = the whole logits, then F.cross_entropy
    loss_chunk: int = 128
    on_nonfinite: str = "stop"  # "stop": raise naming the step; "skip": drop the step and count it
    max_nonfinite_skips: int = 10  # with "skip": more skipped steps than this stops the run
    log_every: int = 10
    checkpoint_every: int = 500  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 1
    progress: bool = True  # tqdm bar on a terminal; elsewhere (a log file) a one-line summary every log_every steps
    # how a step computes its loss (newllm/train/lct.py): "parallel" = model(x); "sequential" = the exact
    # recurrence of a recurrent preset (context_pythia) with gradients through it; "lct" = Lagged Cache Training
    mode: str = "parallel"
    lct: LCTConfig = field(default_factory=LCTConfig)  # options of the sequential and lct modes
    # truncated BPTT (newllm/train/tbptt.py): each batch row reads `carry_windows` consecutive windows of
    # one contiguous stretch of the stream, one per step, the state (memories, KV caches) carried from
    # window to window detached; 1 = every window from an empty state (the shuffled windows above)
    carry_windows: int = 1
    # under torchrun with WORLD_SIZE > 1 (docs/distributed.md): "ddp" = DistributedDataParallel (every rank holds
    # the model); "fsdp" = FSDP2 fully_shard (parameters, gradients and AdamW moments sharded across ranks)
    distributed: str = "ddp"
    # torch.compile the step's forward and backward (and the evaluation forward); the first step compiles
    # (15-40 s for the presets on one CPU core). Off by default: on the CPU it measured no faster (docs/hardware.md)
    compile: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        _check_pos("train", seq_len=self.seq_len, batch_size=self.batch_size, grad_accum=self.grad_accum,
                   lr=self.lr, log_every=self.log_every, keep_checkpoints=self.keep_checkpoints)
        _check_nonneg("train", min_lr=self.min_lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                      checkpoint_every=self.checkpoint_every, max_nonfinite_skips=self.max_nonfinite_skips)
        if self.min_lr > self.lr:
            raise NewLLMError(f"train: min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise NewLLMError("train: set a budget: max_steps, max_tokens or max_minutes")
        for key in ("max_steps", "max_tokens", "max_minutes"):
            if getattr(self, key) is not None:
                _check_pos("train", **{key: getattr(self, key)})
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise NewLLMError(f"train: betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip is not None:
            _check_pos("train", grad_clip=self.grad_clip)
        if self.amp not in AMP_MODES:
            raise NewLLMError(f"train: amp must be one of {AMP_MODES}, got {self.amp!r}")
        _check_nonneg("train", loss_chunk=self.loss_chunk)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise NewLLMError(f"train: on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        if self.mode not in MODES:
            raise NewLLMError(f"train: mode must be one of {MODES}, got {self.mode!r}")
        if self.distributed not in DISTRIBUTED_KINDS:
            raise NewLLMError(f"train: distributed must be one of {DISTRIBUTED_KINDS}, got {self.distributed!r}")
        check_device("train", self.device)
        _check_pos("train", carry_windows=self.carry_windows)
        if self.carry_windows > 1 and self.mode != "parallel":
            raise NewLLMError(f"train: carry_windows={self.carry_windows} (truncated BPTT) needs mode parallel, got "
                              f"mode {self.mode!r} (the recurrent modes carry their own state)")
        if self.compile and self.mode != "parallel":
            raise NewLLMError(f"train: compile: true needs mode parallel, got mode {self.mode!r} (its step, "
                              "newllm.train.lct.step_loss, calls the model itself, token by token or sweep by sweep); "
                              "set compile: false")
        if self.num_threads is not None:
            _check_pos("train", num_threads=self.num_threads)
        for name, group in self.param_groups.items():
            unknown = sorted(set(group) - {"lr", "weight_decay"})
            if unknown:
                raise NewLLMError(f"train: param_groups.{name} has unknown key(s) {unknown}; known: lr, weight_decay")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrainConfig":
        return dataclass_from_dict(cls, d, where)


def check_device(owner: str, device: str) -> None:
    if not DEVICE_RE.match(device):
        raise NewLLMError(f"{owner}: device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def _check_pos(owner, **values):
    for k, v in values.items():
        if v is None or not v > 0 or (isinstance(v, float) and not math.isfinite(v)):
            raise NewLLMError(f"{owner}: {k} must be > 0, got {v}")


def _check_nonneg(owner, **values):
    for k, v in values.items():
        if v is None or v < 0:
            raise NewLLMError(f"{owner}: {k} must be >= 0, got {v}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.2; PyYAML's YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def dump_yaml(d) -> str:
    """`d` as YAML text, keys in their order (what a run writes as config.yaml)."""
    return yaml.safe_dump(d, sort_keys=False)


def load_yaml(path) -> dict[str, Any]:
    path = Path(path)
    try:
        d = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NewLLMError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise NewLLMError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        raise NewLLMError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise NewLLMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise NewLLMError(f"{path}: a recipe must be a mapping of keys to values")
    return d


def apply_overrides(d: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` (value parsed as a YAML scalar/flow value) in a copy of nested dict `d`."""
    import copy

    d = copy.deepcopy(d)
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise NewLLMError(f"--set {item!r}: expected key=value (dotted keys for nested fields)")
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError:
            raise NewLLMError(f"--set {item!r}: value is not a YAML scalar") from None
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise NewLLMError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return d


def load_config(path=None, overrides: list[str] = ()) -> TrainConfig:
    d = load_yaml(path) if path is not None else {}
    d = apply_overrides(d, list(overrides))
    return TrainConfig.from_dict(d, where=str(path) if path is not None else "--set")
