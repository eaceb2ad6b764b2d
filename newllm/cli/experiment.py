"""`newllm experiment`: the comparison experiment (also `python3 scripts/experiment.py`).

    newllm experiment --quick                                   # ~10 min on 2 CPU cores (the README's main job)
    newllm experiment --models pythia infini --samples 10000 --epochs 5 --lr 6e-4
    newllm experiment --config configs/experiment_cpu_1h.yaml
    newllm experiment --resume runs/experiment_quick             # continue: finished models are kept

Settings come from the profile (the seed's full size, or --quick), then --config, then the flags
(--models, --samples, --epochs, --lr, --out, --device), then --set key=value (dotted keys).
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("experiment", help="train and compare models: perplexity, Reversal Curse, passkey, memory",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", metavar="PRESET", help="presets to compare "
                   "(default: pythia infini multi_memory hierarchical)")
    p.add_argument("--quick", action="store_true", help="reduced size: about 10 minutes on 2 CPU cores, real text")
    p.add_argument("--config", help="YAML recipe over the profile (see configs/experiment*.yaml)")
    p.add_argument("--samples", type=int, help="training windows of train.seq_len tokens (default: the whole split; --quick 3072)")
    p.add_argument("--epochs", type=float, help="passes over the training windows (default: the profile's, 4 full, 1 --quick)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--out", help="run folder (default runs/experiment, runs/experiment_quick with --quick)")
    p.add_argument("--device", help="auto (default: cuda when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field (dotted keys: eval.max_tokens=4096); repeatable")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted experiment (its own config)")
    p.add_argument("--data-dir", help="folder holding data/ and tokenizers/ (default: $NEWLLM_DATA_DIR or ../shared)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from newllm.errors import NewLLMError
    from newllm.experiment.config import profile_config
    from newllm.experiment.run import run_experiment

    if args.resume:
        if args.config or args.quick or args.models or args.overrides or args.samples or args.epochs or args.lr \
                or args.out or args.device:
            raise NewLLMError("--resume continues with the run folder's own experiment.yaml; give no other settings")
        run_experiment(resume=args.resume, data_dir=args.data_dir)
        return 0
    flags = []
    if args.models:
        flags.append(f"models=[{', '.join(args.models)}]")
    for key, value in (("samples", args.samples), ("epochs", args.epochs), ("train.lr", args.lr),
                       ("run_dir", args.out), ("device", args.device)):
        if value is not None:
            flags.append(f"{key}={value}")
    if args.lr is not None and not any(o.startswith("train.min_lr=") for o in args.overrides):
        flags.append(f"train.min_lr={args.lr / 10}")  # the cosine ends at a tenth of the peak
    if args.no_progress:
        flags.append("progress=false")
    cfg = profile_config("quick" if args.quick else "full", args.config, [*flags, *args.overrides])
    run_experiment(cfg, data_dir=args.data_dir)
    return 0
