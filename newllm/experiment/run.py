"""The comparison experiment: train each model on the same stream, evaluate, report.

    RUN_DIR/experiment.yaml      the config (what --resume reads back)
    RUN_DIR/tokenizer.json       the one tokenizer every model uses
    RUN_DIR/reversal/*.jsonl     the fictitious facts (paper format: train, test_forward, test_reverse)
    RUN_DIR/models/NAME/         one Trainer run folder per model: checkpoints/, metrics.jsonl, final/,
                                 evals/STAGE.json (each finished evaluation), results.json (all of them)
    RUN_DIR/results.json, RUN_DIR/report.md, RUN_DIR/*.png   (newllm/experiment/report.py)

Every model starts from the same seed and sees the same batches in the same order. `resume=True`
skips models whose results.json exists, continues a half-trained model from its last checkpoint,
and skips evaluation stages already written, so a killed experiment loses at most one checkpoint
interval of training or one evaluation stage.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from newllm.errors import NewLLMError
from newllm.files import atomic_write, write_json, write_text
from newllm.experiment.config import ExperimentConfig, has_memory_layer, load_experiment_config
from newllm.experiment.data import mix_documents

CONFIG_FILE = "experiment.yaml"


def _write_json(path: Path, obj) -> None:
    write_json(path, obj)  # atomic, valid JSON (newllm.files)


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _say(msg: str) -> None:
    print(f"[experiment] {msg}", flush=True)


class Experiment:
    """Holds what the models share (tokenizer, token streams, facts); `run()` goes model by model."""

    def __init__(self, cfg: ExperimentConfig, data_dir=None):
        from newllm.data.corpora import load_tokens, separator_id
        from newllm.train.loop import resolve_device, seed_all
        from newllm.train.run import prepare_tokenizer

        self.cfg, self.root = cfg, Path(cfg.run_dir)
        self.data_dir = data_dir or cfg.data.data_dir
        cfg.data.tokenizer = resolve_tokenizer(cfg.data.tokenizer, self.data_dir)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        seed_all(cfg.seed)
        _say(f"tokenizer and data ({cfg.data.corpus})")
        # the experiment's own folder (run_experiment refused one holding another experiment): its
        # tokenizer.json, once written, is the one every model of the experiment trains with
        self.tok = prepare_tokenizer(cfg.train_config((cfg.models or cfg.isolating.models)[0], 1), self.root,
                                     self.data_dir, resume_from=self.root)
        self.sep = separator_id(self.tok)
        self._load = dict(tokenizer=self.tok, data_dir=self.data_dir, cache_dir=cfg.data.cache_dir)
        self.corpus = corpus = load_tokens(cfg.data.corpus, cfg.data.train_split, **self._load)
        self.facts = self._facts()
        extra = [] if self.facts is None else [self.tok.encode(t) for t in self._fact_documents()]
        seq = cfg.seq_len
        budget = None if cfg.samples is None else cfg.samples * seq + 1
        self.stream = mix_documents(corpus, extra, self.sep, budget, cfg.seed)
        self.n_windows = (len(self.stream.tokens) - 1) // seq
        if self.n_windows < 1:
            raise NewLLMError(f"experiment: the training stream ({len(self.stream.tokens)} tokens) is shorter than "
                              f"one window of train.seq_len={seq} + 1 tokens")
        self.splits = {s: load_tokens(cfg.data.corpus, s, **self._load)
                       for s in dict.fromkeys([*cfg.eval.splits, cfg.eval.position_split])}

    def _facts(self):
        if not self.cfg.reversal.enabled:
            return None
        from newllm.data.reversal import ReversalDataset, make_reversal_dataset

        folder = self.root / "reversal"
        if (folder / "train.jsonl").exists():
            return ReversalDataset.load(folder)
        ds = make_reversal_dataset(self.cfg.reversal.n_facts, seed=self.cfg.reversal.seed)
        ds.save(folder)
        return ds

    def _fact_documents(self) -> list[str]:
        from newllm.data.reversal import training_documents

        return training_documents(self.facts.train, repeats=self.cfg.reversal.repeats)

    def data_info(self) -> dict[str, Any]:
        s = self.stream
        return {"corpus": self.cfg.data.corpus, "tokenizer_vocab": self.tok.vocab_size,
                "train_tokens": int(len(s.tokens)), "corpus_tokens": s.corpus_tokens, "fact_tokens": s.fact_tokens,
                "fact_documents": s.fact_documents, "windows": self.n_windows, "seq_len": self.cfg.seq_len,
                "epochs": self.cfg.epochs,
                "split_tokens": {k: int(len(v)) for k, v in self.splits.items()}}

    # ------------------------------------------------------------------ one model
    def run_model(self, name: str) -> dict[str, Any]:
        cfg, mdir = self.cfg, self.root / "models" / name
        tcfg = cfg.train_config(name, self.n_windows, run_dir=str(mdir))
        model, trainer, res = self.train_model(name, name, tcfg, mdir, self.stream.tokens)
        res["overrides"] = cfg.overrides_for(name)
        return self.run_stages(name, res, mdir, self.stages(model, trainer))

    def train_model(self, key: str, preset: str, tcfg, mdir: Path, tokens):
        """Train (or resume, or find finished) one model in its Trainer run folder `mdir`; returns the
        model, its trainer and the training part of its results."""
        from newllm.checkpoints.native import save_model
        from newllm.train.checkpoint import find_checkpoint
        from newllm.train.loop import seed_all
        from newllm.train.run import build_model
        from newllm.train.tbptt import trainer_class

        seed_all(self.cfg.seed)
        model = build_model(tcfg, self.tok)
        trainer = trainer_class(tcfg)(tcfg, model, tokens, None, run_dir=mdir)
        if (mdir / "checkpoints" / "latest").exists():
            trainer.load(find_checkpoint(mdir))
            _say(f"{key}: resuming at step {trainer.step} of {tcfg.max_steps}")
        _say(f"{key}: {model.num_parameters():,} parameters, {tcfg.max_steps:,} steps of "
             f"{tcfg.tokens_per_step:,} tokens")
        trainer.run(tensorboard=False)
        trainer.metrics.close()
        if not (mdir / "final" / "model.safetensors").exists():
            save_model(model, mdir / "final", metadata={"step": trainer.step, "tokens": trainer.tokens})
            atomic_write(mdir / "final" / "tokenizer.json", self.tok.save)
        res: dict[str, Any] = {
            "preset": preset, "parameters": model.num_parameters(), "memory_layers": has_memory_layer(preset),
            "overrides": dict(tcfg.model.overrides), "steps": trainer.step, "train_tokens": trainer.tokens,
            "train_seconds": trainer.elapsed_s, "train_tokens_per_s": trainer.tokens / max(trainer.elapsed_s, 1e-9),
            "skipped_steps": trainer.skipped,
            "final_train_loss": _last_train_loss(mdir / "metrics.jsonl")}
        return model, trainer, res

    def run_stages(self, key: str, res: dict[str, Any], mdir: Path,
                   stages: list[tuple[str, Callable[[], dict]]]) -> dict[str, Any]:
        """Run every stage whose evals/STAGE.json is missing; read back the others."""
        evals = mdir / "evals"
        evals.mkdir(exist_ok=True)
        for stage, fn in stages:
            path = evals / f"{stage}.json"
            if path.exists():
                res[stage] = json.loads(path.read_text())
                continue
            _say(f"{key}: {stage}")
            t0 = time.perf_counter()
            out = fn()
            out["seconds"] = round(time.perf_counter() - t0, 2)
            _write_json(path, out)
            res[stage] = out
        return res

    def stages(self, model, trainer) -> list[tuple[str, Callable[[], dict]]]:
        cfg = self.cfg
        out: list[tuple[str, Callable[[], dict]]] = [("ppl", lambda: self.eval_ppl(trainer)),
                                                     ("probes", lambda: self.eval_probes(model))]
        if cfg.reversal.enabled:
            out.append(("reversal", lambda: self.eval_reversal(model)))
        groups = finetune_groups(trainer.cfg)
        if cfg.passkey.enabled:
            out.append(("passkey", lambda: self.eval_passkey(model, groups)))
        if cfg.recall.enabled:
            out.append(("recall", lambda: self.eval_recall(model, groups)))
        return out

    # ------------------------------------------------------------------ evaluations
    def eval_ppl(self, trainer) -> dict:
        from newllm.data.corpora import scored_text

        out = {"context": self.cfg.eval.context, "stride": self.cfg.eval.stride}
        for split in self.cfg.eval.splits:
            tokens = self.splits[split]
            if self.cfg.eval.max_tokens is not None:
                tokens = tokens[:self.cfg.eval.max_tokens]
            r = trainer.perplexity(torch.from_numpy(np.asarray(tokens).astype(np.int64)),
                                   text=scored_text(tokens, self.tok, self.sep), progress=self.cfg.progress)
            out[split] = {k: getattr(r, k) for k in ("token_ppl", "word_ppl", "bits_per_byte", "n_tokens", "n_words",
                                                     "n_bytes", "nll_sum")}
        return out

    def eval_probes(self, model) -> dict:
        from newllm.eval.position import long_documents
        from newllm.experiment.probes import inference_speed, loss_by_position

        e = self.cfg.eval
        length = e.position_context or e.context
        docs = long_documents(self.splits[e.position_split], self.sep, length, e.position_docs)
        if not docs:
            raise NewLLMError(f"experiment: no document of the {e.position_split} split has {length} tokens; "
                              f"lower eval.position_context")
        out = {"position": loss_by_position(model, docs, e.position_bins, progress=self.cfg.progress)}
        out["speed"] = inference_speed(model, self.splits[e.position_split], e.context, e.batch_size, e.speed_repeats)
        return out

    def eval_reversal(self, model) -> dict:
        from newllm.eval.reversal import reversal_eval

        r = self.cfg.reversal
        res = reversal_eval(model, self.tok, self.facts.test_forward, self.facts.test_reverse, trained=self.facts.train,
                            max_new_tokens=r.max_new_tokens, batch_size=r.batch_size, progress=self.cfg.progress)
        return res.to_dict()

    def eval_passkey(self, model, param_groups: dict | None = None) -> dict:
        """`param_groups`: the fine-tune's group settings (`finetune_groups`: the gates' lr)."""
        from newllm.eval.passkey import passkey_eval
        from newllm.train.finetune import passkey_finetune

        p = self.cfg.passkey
        losses = []
        if p.finetune_steps:
            model = copy.deepcopy(model)  # the fine-tune is for this evaluation only
            losses = passkey_finetune(model, self.tok, p.finetune_steps, p.finetune_lengths or p.lengths,
                                      lr=p.finetune_lr, batch_size=p.finetune_batch_size, seed=p.seed + 1,
                                      digits=p.digits, progress=self.cfg.progress, param_groups=param_groups)
        res = passkey_eval(model, self.tok, p.lengths, p.depths, n_per_cell=p.n_per_cell, seed=p.seed,
                           digits=p.digits, progress=self.cfg.progress)
        return {**res.to_dict(), "overall": res.overall, "finetune_steps": p.finetune_steps,
                "finetune_losses": losses, "finetune_param_groups": param_groups}

    def eval_recall(self, model, param_groups: dict | None = None) -> dict:
        """`param_groups`: the recall training's group settings (`finetune_groups`: the gates' lr)."""
        from newllm.data.recall import make_recall_batch
        from newllm.eval.recall import recall_eval
        from newllm.train.finetune import recall_train

        r, seg = self.cfg.recall, self._segment_length()
        model = copy.deepcopy(model)  # trained on the task for this evaluation only
        kw = dict(tokenizer=self.tok, n_keys=r.n_keys, n_values=r.n_values)
        losses = recall_train(model, r.steps, n_pairs=r.n_pairs, segment_length=seg, batch=r.batch_size, lr=r.lr,
                              seed=r.seed + 1, progress=self.cfg.progress, param_groups=param_groups, **kw)
        g = torch.Generator().manual_seed(r.seed)  # held-out batches: another seed than training's
        accs = [recall_eval(model, *make_recall_batch(r.n_pairs, seg, r.batch_size, g, **kw))
                for _ in range(r.eval_batches)]
        return {"accuracy": float(np.mean(accs)), "chance": 1.0 / r.n_values, "segment_length": seg,
                "n_pairs": r.n_pairs, "steps": r.steps, "losses": losses, "param_groups": param_groups}

    def _segment_length(self) -> int:
        seg = self.cfg.memory_overrides.get("segment_length")
        return int(seg) if seg else self.cfg.seq_len // 4

    # ------------------------------------------------------------------ all models
    def run(self, progress_report: bool = True) -> dict[str, Any]:
        from newllm.experiment.report import write_report

        results: dict[str, Any] = {}
        for i, name in enumerate(self.cfg.models, 1):
            path = self.root / "models" / name / "results.json"
            if path.exists():
                _say(f"[{i}/{len(self.cfg.models)}] {name}: finished earlier, skipped")
                results[name] = json.loads(path.read_text())
                continue
            _say(f"[{i}/{len(self.cfg.models)}] {name}")
            results[name] = self.run_model(name)
            _write_json(path, results[name])
            if progress_report:
                write_report(self.summary(results), self.root)
        self.isolating = None
        if self.cfg.isolating.enabled:
            from newllm.experiment.isolating import Isolating

            self.isolating = Isolating(self)
            self.isolating.run(lambda: write_report(self.summary(results), self.root) if progress_report else None)
        summary = self.summary(results)
        write_report(summary, self.root)
        _say(f"done: {self.root / 'report.md'}")
        return summary

    def summary(self, results: dict[str, Any]) -> dict[str, Any]:
        out = {"profile": self.cfg.profile, "config": self.cfg.to_dict(), "machine": machine_info(self.device),
               "data": self.data_info(), "models": results}
        if getattr(self, "isolating", None) is not None:
            out["isolating"] = self.isolating.summary()
        return out


def run_experiment(cfg: ExperimentConfig | None = None, resume=None, data_dir=None) -> dict[str, Any]:
    """Run (or with `resume=RUN_DIR` continue) an experiment; returns what results.json holds."""
    import yaml

    if resume is not None:
        path = Path(resume) / CONFIG_FILE
        if not path.exists():
            raise NewLLMError(f"--resume {resume}: no {CONFIG_FILE} there (not an experiment run folder)")
        cfg = load_experiment_config(path)
        cfg.run_dir = str(resume)
    elif cfg is None:
        raise NewLLMError("run_experiment: give a config or resume=RUN_DIR")
    else:
        root = Path(cfg.run_dir)
        if (root / CONFIG_FILE).exists():
            raise NewLLMError(f"{root} already holds an experiment; continue it with --resume {root} or choose "
                              f"another --out")
        root.mkdir(parents=True, exist_ok=True)
        write_text(root / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return Experiment(cfg, data_dir=data_dir).run()


def finetune_groups(tcfg) -> dict[str, dict[str, float]] | None:
    """Group settings for a model's evaluation fine-tunes (passkey, recall): the gates' lr of its
    training (`gate_lr`, which `ExperimentConfig.train_config` puts into train.param_groups.gates, or
    an lr set there directly), so a short fine-tune can move the gates too; None (every group at the
    fine-tune's own lr) for a model whose training gave its gates no lr of their own."""
    lr = tcfg.param_groups.get("gates", {}).get("lr")
    return None if lr is None else {"gates": {"lr": float(lr)}}


def resolve_tokenizer(name: str | None, data_dir=None) -> str | None:
    """A tokenizer path as given, or a name under DATA_DIR/tokenizers/NAME/tokenizer.json (gpt-neox-20b)."""
    if name is None or Path(name).exists():
        return name
    from newllm.data.corpora import find_data_dir

    candidate = find_data_dir(data_dir) / "tokenizers" / name / "tokenizer.json"
    if candidate.exists():
        return str(candidate)
    raise NewLLMError(f"experiment: tokenizer {name!r} is neither a file nor {candidate}")


def _last_train_loss(path: Path) -> float | None:
    from newllm.train.metrics import read_records

    last = None
    if path.exists():
        for rec in read_records(path):
            if rec.get("kind") == "train" and "loss" in rec:
                last = rec["loss"]
    return last
