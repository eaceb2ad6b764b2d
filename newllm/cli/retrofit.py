"""`newllm retrofit --config configs/retrofit_X.yaml [--set key=value ...]` or `newllm retrofit --resume RUN_DIR`.

Replaces layers of a pretrained model by memory layers, trains them stage by stage and writes the
debug checklist after each stage (newllm/retrofit/run.py; docs/retrofit.md). `--set stages.0.steps=50`
reaches into a stage by its index. With `--resume`, the run folder's own config.yaml is used (and
`--set` edits it); finished stages are kept, the unfinished one continues from its last checkpoint.
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("retrofit", help="retrofit memory layers into a pretrained model (configs/retrofit_*.yaml)")
    p.add_argument("--config", help="YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (dotted keys; stages.N.field for stage N); repeatable")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder")
    p.add_argument("--data-dir", help="folder holding data/ and models/ (default: $NEWLLM_DATA_DIR or ../shared)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from newllm.errors import NewLLMError
    from newllm.retrofit.config import load_retrofit_config
    from newllm.retrofit.run import run_retrofit

    if args.resume:
        if args.config:
            raise NewLLMError("--resume uses the run folder's own config.yaml; drop --config "
                              "(use --set to change fields)")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise NewLLMError(f"{args.resume}: no config.yaml, so not a retrofit run folder")
        cfg = load_retrofit_config(saved, [*args.overrides, f"run_dir={args.resume}"])
    elif args.config:
        cfg = load_retrofit_config(args.config, args.overrides)
    else:
        raise NewLLMError("give --config RECIPE.yaml (see configs/retrofit_*.yaml) or --resume RUN_DIR")
    results = run_retrofit(cfg, resume=bool(args.resume), data_dir=args.data_dir)
    keep = {k: results[k] for k in ("baseline", "retrofit", "train_tokens", "train_s") if k in results}
    print(json.dumps(keep, indent=2))
    print(f"newllm retrofit: report {Path(cfg.run_dir) / 'report.md'}")
    return 0
