"""The isolating setting: an experiment in which the memory is the only route past the attention window.

Every softmax layer gets a window of W keys (`isolating.window`), so a stack reaches
`model.receptive_field` = sum of its layers' spans back (L x (W - 1) for L windowed layers; a
memory layer's local attention reaches S - 1, its segment). The tasks put their information
further back than the largest receptive field R of the windowed models, at multiples of it:

* passkey: the needle ends `ceil(f x R)` tokens before the answer; one copy of the model is
  fine-tuned per training distance and scored at every test distance (the heat map);
* associative recall: the pairs sit at least `ceil(f x R)` tokens before their queries
  (`newllm.data.recall.recall_gap`); trained at the first distance, scored at each;
* loss by position on long real documents (the Gutenberg books) past R, with a bootstrap interval
  over documents (`newllm.eval.position.loss_beyond`);

each with the memory switched off on the same weights. Training: windows of k x S tokens (k =
`segments_per_window`, so gradients flow through the k segments of a window) with the state carried
across `carry_windows` consecutive windows (truncated BPTT, `newllm.train.tbptt`), the gates at
`gate_lr`. The models listed in `full_attention` are trained again without the window: the
baseline that sees everything by attention.

Run folders: RUN_DIR/isolating/KEY/ (a Trainer run folder with evals/STAGE.json, results.json);
KEY is the preset name, or NAME-full for the full-attention copy. Resume works as for the main
comparison: finished models and stages are read back.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Callable

import numpy as np
import torch

from newllm.errors import NewLLMError
from newllm.experiment.config import has_memory_layer
from newllm.files import write_json


def memory_dims(model) -> dict[str, int]:
    """Each memory layer's key dimension d (Dm): a d-dimensional linear memory holds at most d
    associations it can read back exactly (d orthogonal keys), the bound the capacity sweep is read against."""
    return {f"L{i}": int(layer.mixer.config.memory_dim) for i, layer in enumerate(model.layers)
            if layer.has_compressive_memory and hasattr(getattr(layer, "mixer", None), "config")
            and hasattr(layer.mixer.config, "memory_dim")}


def receptive_field_of(tcfg, tokenizer) -> int | None:
    """The receptive field of the model a TrainConfig builds (on the meta device: shapes only)."""
    from newllm.train.run import build_model

    with torch.device("meta"):
        return build_model(tcfg, tokenizer).receptive_field


class Isolating:
    """The isolating part of an `Experiment` (module doc): `run()` trains and evaluates each model."""

    def __init__(self, exp):
        from newllm.experiment.data import mix_documents

        self.exp, self.cfg, self.iso = exp, exp.cfg, exp.cfg.isolating
        self.S = self.cfg.isolating_segment_length
        self.seq_len = self.iso.segments_per_window * self.S
        budget = (len(exp.stream.tokens) if self.iso.samples is None else self.iso.samples * self.seq_len + 1)
        self.stream = mix_documents(exp.corpus, [], exp.sep, budget, self.cfg.seed).tokens
        self.n_windows = (len(self.stream) - 1) // self.seq_len
        self.entries = [(name, name, False) for name in self.iso.models]
        self.entries += [(f"{name}-full", name, True) for name in self.iso.full_attention]
        self.tcfgs = {key: self.cfg.isolating_train_config(preset, self.n_windows, str(exp.root / "isolating" / key),
                                                           full_attention=full)
                      for key, preset, full in self.entries}
        self.fields = {key: receptive_field_of(self.tcfgs[key], exp.tok) for key, _, _ in self.entries}
        bounded = [f for f in self.fields.values() if f is not None]
        if not bounded:
            raise NewLLMError("isolating: no model has a bounded receptive field (every one attends to everything); "
                              "list a windowed or memory preset in isolating.models")
        self.R = max(bounded)
        if self.iso.recall.enabled and 2 * max([self.iso.recall.n_pairs, *self.iso.recall.capacity]) + 1 > self.S:
            raise NewLLMError(f"isolating.recall: segment length {self.S} holds fewer than 2 x n_pairs + 1 tokens for "
                              f"n_pairs {self.iso.recall.n_pairs} / capacity {self.iso.recall.capacity}")
        self.results: dict[str, Any] = {}

    def distance(self, factor: float) -> int:
        return math.ceil(factor * self.R)

    # ------------------------------------------------------------------ run
    def run(self, progress: Callable[[], None]) -> None:
        from newllm.experiment.run import _say

        for i, (key, preset, full) in enumerate(self.entries, 1):
            mdir = self.exp.root / "isolating" / key
            path = mdir / "results.json"
            if path.exists():
                _say(f"[isolating {i}/{len(self.entries)}] {key}: finished earlier, skipped")
                self.results[key] = json.loads(path.read_text())
                continue
            _say(f"[isolating {i}/{len(self.entries)}] {key} (receptive field {self.fields[key]})")
            tcfg = self.tcfgs[key]
            model, trainer, res = self.exp.train_model(key, preset, tcfg, mdir, self.stream)
            res.update(full_attention=full, receptive_field=self.fields[key], window=None if full else self.iso.window)
            self.results[key] = self.exp.run_stages(key, res, mdir, self.stages(model, tcfg))
            write_json(path, self.results[key])
            progress()

    def stages(self, model, tcfg) -> list[tuple[str, Callable[[], dict]]]:
        from newllm.experiment.run import finetune_groups

        groups = finetune_groups(tcfg)
        out = []
        if self.iso.passkey.enabled:
            out.append(("iso_passkey", lambda: self.eval_passkey(model, groups)))
        if self.iso.recall.enabled:
            out.append(("iso_recall", lambda: self.eval_recall(model, groups)))
        if self.iso.position.enabled:
            out.append(("iso_position", lambda: self.eval_position(model)))
        return out

    # ------------------------------------------------------------------ the tasks
    def eval_passkey(self, model, groups) -> dict:
        from newllm.eval.passkey import passkey_distance_eval
        from newllm.train.finetune import passkey_distance_finetune

        p = self.iso.passkey
        tests = [self.distance(f) for f in p.test_distances]
        rows = []
        for f in p.train_distances:
            d = self.distance(f)
            tuned = copy.deepcopy(model)  # one fine-tuned copy per training distance
            losses = passkey_distance_finetune(tuned, self.exp.tok, p.steps, [d], lr=p.lr, batch_size=p.batch_size,
                                               seed=p.seed + 1, digits=p.digits, lead=p.lead,
                                               progress=self.cfg.progress, param_groups=groups)
            res = passkey_distance_eval(tuned, self.exp.tok, tests, n_per_distance=p.n_per_distance, seed=p.seed,
                                        digits=p.digits, lead=p.lead, progress=self.cfg.progress)
            rows.append({"train_distance": d, "losses": losses, **res})
        return {"train_distances": [self.distance(f) for f in p.train_distances], "test_distances": tests,
                "accuracy": [r["accuracy"] for r in rows], "accuracy_memory_off": [r["accuracy_memory_off"] for r in rows],
                "rows": rows, "param_groups": groups}

    def eval_recall(self, model, groups) -> dict:
        from newllm.data.recall import make_recall_batch, recall_distance, recall_gap
        from newllm.eval.ablation import has_memory, memory_read_norms, memory_switched_off
        from newllm.eval.recall import recall_eval
        from newllm.train.finetune import recall_train

        r, S = self.iso.recall, self.S
        kw = dict(tokenizer=self.exp.tok, n_keys=r.n_keys, n_values=r.n_values)
        gaps = [recall_gap(self.distance(f), r.n_pairs, S) for f in r.distances]
        tuned = copy.deepcopy(model)
        losses = recall_train(tuned, r.steps, n_pairs=r.n_pairs, segment_length=S, batch=r.batch_size, lr=r.lr,
                              seed=r.seed + 1, progress=self.cfg.progress, param_groups=groups, n_segments_gap=gaps[0],
                              **kw)
        memory = has_memory(tuned)

        def score(n_pairs: int, gap: int) -> tuple[float, float | None, list]:
            g = torch.Generator().manual_seed(r.seed)  # held-out batches: another seed than training's
            batches = [make_recall_batch(n_pairs, S, r.batch_size, g, n_segments_gap=gap, **kw)
                       for _ in range(r.eval_batches)]
            on = float(np.mean([recall_eval(tuned, *b) for b in batches]))
            if not memory:
                return on, None, batches
            with memory_switched_off(tuned):
                return on, float(np.mean([recall_eval(tuned, *b) for b in batches])), batches

        on, off = [], []
        for gap in gaps:
            a, b, batches = score(r.n_pairs, gap)
            on.append(a)
            off.append(b)
        out = {"distances": [recall_distance(r.n_pairs, S, gap) for gap in gaps], "gaps": gaps,
               "train_distance": recall_distance(r.n_pairs, S, gaps[0]), "accuracy": on,
               "accuracy_memory_off": off if memory else None, "chance": 1.0 / r.n_values, "n_pairs": r.n_pairs,
               "steps": r.steps, "losses": losses, "param_groups": groups}
        if memory:
            # diagnosis: what the memory reads where the answers are predicted (the training distance)
            ids, labels = make_recall_batch(r.n_pairs, S, r.batch_size, torch.Generator().manual_seed(r.seed),
                                            n_segments_gap=gaps[0], **kw)
            answers = torch.zeros_like(labels, dtype=torch.bool)
            answers[:, :-1] = labels[:, 1:] != -100  # position t predicts label t + 1
            out["read_norms"] = memory_read_norms(tuned, ids, answers)
            # the capacity sweep: pairs stored against accuracy, every pair beyond the receptive field
            sweep = []
            for n in r.capacity:
                gap = recall_gap(self.distance(r.distances[0]), n, S)
                a, b, _ = score(n, gap)
                sweep.append({"n_pairs": n, "gap": gap, "accuracy": a, "accuracy_memory_off": b})
            out["capacity"] = {"rows": sweep, "memory_dims": memory_dims(tuned)}
        return out

    def eval_position(self, model) -> dict:
        from newllm.data.corpora import load_tokens
        from newllm.eval.position import long_documents, loss_beyond

        p = self.iso.position
        if p.length <= self.R + 1:
            raise NewLLMError(f"isolating.position.length {p.length} must exceed the receptive field {self.R} + 1")
        tokens = load_tokens(p.corpus, p.split, **self.exp._load)
        docs = long_documents(tokens, self.exp.sep, p.length, p.docs)
        if not docs:
            raise NewLLMError(f"isolating: no document of {p.corpus}/{p.split} has {p.length} tokens; lower "
                              "isolating.position.length")
        return loss_beyond(model, docs, start=self.R + 1, chunk=self.seq_len, confidence=p.confidence,
                           resamples=p.resamples, seed=p.seed)

    # ------------------------------------------------------------------ results
    def versus_window(self) -> dict[str, Any]:
        """Each memory model's loss past R against the window-only baseline's, paired by document (both
        read the same documents): baseline - model per document, mean and bootstrap interval (nats; > 0:
        the memory model is below the baseline)."""
        from newllm.eval.position import bootstrap_ci

        memory = {k for k, p, _ in self.entries if has_memory_layer(p)}
        baselines = [k for k, p, full in self.entries if not full and k not in memory]
        p = self.iso.position
        out: dict[str, Any] = {}
        for key in memory:
            mine = (self.results.get(key) or {}).get("iso_position")
            for base in baselines:
                theirs = (self.results.get(base) or {}).get("iso_position")
                if not mine or not theirs:
                    continue
                diff = np.array(theirs["on"]["per_doc"]) - np.array(mine["on"]["per_doc"])
                lo, hi = bootstrap_ci(diff, p.confidence, p.resamples, p.seed)
                out[key] = {"baseline": base, "mean": float(diff.mean()), "ci": [lo, hi],
                            "per_doc": [float(v) for v in diff]}
                break
        return out

    def gate_history(self) -> dict[str, Any]:
        """Each memory model's gates over its training (the mean of every `gate.L{i}.NAME.mean` the
        Trainer logged): {key: {"steps": [...], "L0.memory": [...], ...}}."""
        from newllm.train.metrics import read_records

        out: dict[str, Any] = {}
        for key, preset, _ in self.entries:
            path = self.exp.root / "isolating" / key / "metrics.jsonl"
            if not has_memory_layer(preset) or not path.exists():
                continue
            recs = [r for r in read_records(path) if r.get("kind") == "train"]
            names = sorted({k[len("gate."):-len(".mean")] for r in recs for k in r
                            if k.startswith("gate.") and k.endswith(".mean")})
            if names:
                out[key] = {"steps": [r["step"] for r in recs],
                            **{n: [r.get(f"gate.{n}.mean") for r in recs] for n in names}}
        return out

    def summary(self) -> dict[str, Any]:
        return {"versus_window": self.versus_window(), "gate_history": self.gate_history(), "receptive_field": self.R, "window": self.iso.window, "segment_length": self.S,
                "seq_len": self.seq_len, "segments_per_window": self.iso.segments_per_window,
                "carry_windows": self.iso.carry_windows, "train_tokens": int(len(self.stream)),
                "receptive_fields": self.fields, "memory_layers": {k: has_memory_layer(p) for k, p, _ in self.entries},
                "models": self.results}
