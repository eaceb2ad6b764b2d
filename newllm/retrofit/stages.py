"""The stages of a retrofit, each a run of the ordinary `Trainer` (resume, progress bar, metrics,
non-finite skip) with its own parameters, learning rates and loss (kinds: newllm/retrofit/config.py).

`StageTrainer(stage, student, teacher, layers, tokens, run_dir, recipe)`:

* freezes the model, then unfreezes what the stage trains (`trainable`);
* builds AdamW groups: `replaced` (the replaced layers' trained parameters), `others` (stage `full`:
  everything else), `gates` (what the layers declare as gates: memory beta, window factors, an
  adapter's alpha; at `gates_lr`), `lora` (stage `lora`: PEFT's A/B matrices); each group's
  lr follows the Trainer's warmup + cosine schedule;
* computes the stage's loss from the Trainer's token windows:
  - `transfer`: for each replaced layer, loss(student layer or mixer on the TEACHER's input, the
    teacher's output). The teacher's activations are computed once per training window and cached
    (the windows repeat every epoch of `train_tokens`), so a step runs only the replaced layers;
  - otherwise: ce_weight x CE(student) + kl_weight x T^2 KL(teacher_T || student_T).

A stage killed mid-way resumes from its last checkpoint (`Trainer.load`) to the same result: the
teacher cache is rebuilt on demand (the teacher is fixed), everything else is in the checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from newllm.errors import NewLLMError
from newllm.retrofit.guards import NumericWatch
from newllm.retrofit.transfer import new_parameters
from newllm.train.config import DataConfig, EvalConfig, TrainConfig
from newllm.train.loop import Trainer


def stage_train_config(stage, recipe, run_dir, tokenizer_path: str) -> TrainConfig:
    """The Trainer's config for one stage (its budget, schedule, batch, checkpoints)."""
    return TrainConfig(
        data=DataConfig(corpus=recipe.corpus, tokenizer=tokenizer_path), eval=EvalConfig(every=0),
        run_dir=str(run_dir), device=recipe.device, seed=recipe.seed, seq_len=stage.seq_len,
        batch_size=stage.batch_size, max_steps=stage.steps, lr=stage.lr,
        min_lr=stage.lr if stage.min_lr is None else stage.min_lr, warmup_steps=stage.warmup_steps,
        weight_decay=stage.weight_decay, grad_clip=stage.grad_clip, amp=recipe.amp,
        on_nonfinite=recipe.on_nonfinite, max_nonfinite_skips=recipe.max_nonfinite_skips,
        log_every=stage.log_every, checkpoint_every=stage.checkpoint_every, progress=recipe.progress)


def _gates(layer) -> list[nn.Parameter]:
    return [p for m in layer.modules() if hasattr(m, "param_groups") for p in m.param_groups().get("gates", [])]


def replaced_parameters(layer, train: str) -> list[nn.Parameter]:
    """What a stage trains in a replaced layer: `new` = what its mixer adds to the copied attention
    (feature maps, window factors, gates), `layer` = all of it. In a ParallelAdapter only the new
    branch and alpha ever train (`new`: the new mixer's additions and alpha; `layer`: the whole new
    layer and alpha)."""
    from newllm.models.layers.adapter import ParallelAdapter

    if isinstance(layer, ParallelAdapter):  # the original branch never trains
        inner = layer.new
        if train == "layer" or not hasattr(inner, "mixer"):
            return list(inner.parameters()) + [layer.alpha]
        return new_parameters(inner.mixer) + [layer.alpha]
    if train == "layer":
        return list(layer.parameters())
    if not hasattr(layer, "mixer"):
        raise NewLLMError(f"{type(layer).__name__} has no token mixer: use train: layer")
    return new_parameters(layer.mixer)


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class StageTrainer(Trainer):
    #: its losses call the student's layers (or mixers) and the teacher directly, not `self.net`, so there is
    #: no compiled step to take (the Trainer refuses `compile: true` for it; stage_train_config never sets it)
    step_through_net = False

    def __init__(self, stage, student, teacher, layers: list[int], train_tokens, run_dir, recipe, tokenizer_path):
        self.stage, self.teacher, self.replaced = stage, teacher, list(layers)
        self.teacher_cache: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.watch = NumericWatch(student)
        if stage.kind == "lora":
            from newllm.retrofit.lora import add_lora

            add_lora(student, stage.lora)
        self._freeze(student)
        cfg = stage_train_config(stage, recipe, run_dir, tokenizer_path)
        super().__init__(cfg, student, train_tokens, None, run_dir=run_dir)
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if stage.kind == "transfer":
            for i in self.replaced:
                if stage.target == "mixer" and not hasattr(student.layers[i], "mixer"):
                    raise NewLLMError(f"stage {stage.name}: layer {i} ({type(student.layers[i]).__name__}) has no "
                                      "token mixer; use target: layer")

    # ------------------------------------------------------------------ what trains, at which lr
    def _freeze(self, model) -> None:
        s = self.stage
        lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        for p in model.parameters():
            p.requires_grad_(False)
        chosen: list[nn.Parameter] = []
        if s.kind == "full":
            chosen = [p for p in model.parameters() if id(p) not in lora]
        elif s.kind == "lora":
            chosen = [p for p in model.parameters() if id(p) in lora]
            if s.train == "new":
                chosen += [p for i in self.replaced for p in replaced_parameters(model.layers[i], "new")]
        else:
            chosen = [p for i in self.replaced for p in replaced_parameters(model.layers[i], s.train)]
        for p in chosen:
            p.requires_grad_(True)
        if not any(p.requires_grad for p in model.parameters()):
            raise NewLLMError(f"stage {s.name}: nothing to train")

    def group_lrs(self) -> dict[str, float]:
        s = self.stage
        if s.kind == "full":
            return {"replaced": s.lr * s.replaced_lr_scale, "others": s.lr * s.other_lr_scale,
                    "gates": s.gates_lr if s.gates_lr is not None else s.lr * s.replaced_lr_scale, "lora": s.lr}
        return {"replaced": s.lr, "others": s.lr, "gates": s.gates_lr if s.gates_lr is not None else s.lr, "lora": s.lr}

    def param_group_members(self) -> dict[str, list[nn.Parameter]]:
        model = self.model
        lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        gates = {id(p) for layer in model.layers for p in _gates(layer)}
        replaced = {id(p) for i in self.replaced for p in model.layers[i].parameters()}
        groups: dict[str, list[nn.Parameter]] = {"replaced": [], "others": [], "gates": [], "lora": []}
        for p in _unique(model.parameters()):
            if not p.requires_grad:
                continue
            name = ("lora" if id(p) in lora else "gates" if id(p) in gates else
                    "replaced" if id(p) in replaced else "others")
            groups[name].append(p)
        return {k: v for k, v in groups.items() if v}

    def make_optimizer(self) -> torch.optim.Optimizer:
        lrs = self.group_lrs()
        groups = []
        for name, params in self.param_group_members().items():
            wd = 0.0 if name == "gates" else self.stage.weight_decay
            groups.append({"name": name, "params": params, "lr": lrs[name], "base_lr": lrs[name], "weight_decay": wd})
        fused = {"fused": True} if next(self.model.parameters()).is_cuda else {}
        return torch.optim.AdamW(groups, lr=self.stage.lr, betas=tuple(self.cfg.betas), eps=self.cfg.eps, **fused)

    def _group_base_lr(self, name: str) -> float:
        return self.group_lrs()[name]

    # ------------------------------------------------------------------ losses
    def teacher_io(self, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (teacher input (B, T, d), teacher output (B, T, d))} of the replaced layers (or their
        mixers) for the micro-batch x, from the cache keyed by window index."""
        ids = list(self.sampler.last_ids)
        todo = [j for j, w in enumerate(ids) if w not in self.teacher_cache]
        if todo:
            got = capture_io(self.teacher, self.replaced, x[todo, :-1], self.stage.target)
            for r, j in enumerate(todo):
                self.teacher_cache[ids[j]] = {i: (a[r:r + 1].cpu(), b[r:r + 1].cpu()) for i, (a, b) in got.items()}
        return {i: (torch.cat([self.teacher_cache[w][i][0] for w in ids]).to(self.device),
                    torch.cat([self.teacher_cache[w][i][1] for w in ids]).to(self.device)) for i in self.replaced}

    def distill_loss(self, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s, y, target = self.stage, y.float(), target.float()
        if s.loss == "mse":
            loss = F.mse_loss(y, target)
        elif s.loss == "huber":
            loss = F.huber_loss(y, target, delta=s.huber_delta)
        else:  # cosine: direction only (seed 000: only when the scale is already lost)
            loss = 1.0 - F.cosine_similarity(y, target, dim=-1).mean()
        return s.loss_scale * loss

    def batch_loss(self, x: torch.Tensor, micro: int) -> torch.Tensor:
        s, model = self.stage, self.model
        if s.kind == "transfer":
            total = torch.zeros((), device=self.device)
            for i, (inp, target) in self.teacher_io(x).items():
                part = model.layers[i].mixer if s.target == "mixer" else model.layers[i]
                with self.autocast():
                    y, _ = part(inp)
                self.watch.observe(f"L{i}" + (".mixer" if s.target == "mixer" else ""), y)
                total = total + self.distill_loss(y, target)
            return total
        with self.autocast():
            logits = model(x[:, :-1]).logits
        logits = logits.float()
        loss = s.ce_weight * F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) if s.ce_weight else 0.0
        if s.kl_weight:
            with torch.no_grad(), self.autocast():
                t_logits = self.teacher(x[:, :-1]).logits
            T = s.kl_temperature
            log_p = F.log_softmax(logits / T, -1).flatten(0, 1)
            log_q = F.log_softmax(t_logits.float() / T, -1).flatten(0, 1)  # the teacher's
            kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * T * T  # KL(teacher || student)
            loss = loss + s.kl_weight * kl
        return loss

    def gate_stats(self) -> dict[str, float]:
        t = self.watch.totals()
        return {**super().gate_stats(), "nonfinite_values": t["nonfinite"] + t["mixer_nonfinite"],
                "fp16_overflow_values": t["fp16_overflow"] + t["mixer_fp16_overflow"]}

    def run(self, stop_after: int | None = None, tensorboard: bool = False) -> None:
        with self.watch:
            super().run(stop_after=stop_after, tensorboard=tensorboard)


@torch.no_grad()
def capture_io(model, layers: list[int], ids: torch.Tensor, target: str = "layer"):
    """{layer: (input, output)} of `model`'s `layers` (target "layer") or of their token mixers
    ("mixer") for one forward pass over ids (B, T), from an empty memory."""
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i):
        def fn(_m, inp, out):
            got[i] = (inp[0].detach(), (out[0] if isinstance(out, tuple) else out).detach())
        return fn

    mods = [model.layers[i] if target == "layer" else model.layers[i].mixer for i in layers]
    handles = [m.register_forward_hook(hook(i)) for i, m in zip(layers, mods)]
    try:
        with model.memory_aside(train=False):
            model(ids, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return got
