"""`newllm train --config configs/X.yaml [--mode lct] [--set key=value ...]` or `newllm train --resume RUN_DIR`.

`--set` takes dotted keys for nested fields (`--set eval.every=100 --set model.overrides.hidden_size=128`);
values are YAML scalars. With `--resume`, the checkpoint's own config is used and `--set` edits it
(e.g. a larger `max_steps` to extend a finished run); the run continues in the run folder that holds
the checkpoint (RUN_DIR/checkpoints/step-N), wherever that run folder has been moved (a checkpoint
folder moved out of its run needs `--set run_dir=DIR`).

A fresh run refuses a run_dir that holds a previous run (checkpoints, final model, metrics): resume
it, choose another run_dir, or pass `--force` to start over there (the previous outputs are deleted).

Several processes: `torchrun --nproc_per_node N -m newllm train --config ...` (also with --resume);
see docs/distributed.md.
"""
from __future__ import annotations

from newllm.train.lct import MODES


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML recipe (configs/*.yaml)")
    p.add_argument("--config", help="YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (dotted keys for nested fields); repeatable")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue from a run folder or checkpoint folder")
    p.add_argument("--mode", choices=MODES,
                   help="how steps compute the loss: parallel (default), or for a recurrent preset (context_pythia) "
                        "the exact sequential recurrence or Lagged Cache Training; same as --set mode=...")
    p.add_argument("--data-dir", help="folder holding data/ (default: $NEWLLM_DATA_DIR or ../shared)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    p.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases (same as --set wandb.enabled=true; pip install 'newllm[wandb]')")
    p.add_argument("--force", action="store_true",
                   help="start over in a run_dir that holds a previous run (deletes its checkpoints, final model, "
                        "metrics)")
    p.set_defaults(func=run)


def run(args) -> int:
    from newllm.errors import NewLLMError
    from newllm.files import dumps_json
    from newllm.train.checkpoint import find_checkpoint, load_trainer_state, run_dir_of
    from newllm.train.config import TrainConfig, apply_overrides, load_config
    from newllm.train.run import train

    if args.mode:
        args.overrides = [*args.overrides, f"mode={args.mode}"]
    if args.wandb:
        args.overrides = [*args.overrides, "wandb.enabled=true"]
    if args.resume:
        if args.config:
            raise NewLLMError("--resume uses the checkpoint's own config; drop --config (use --set to change fields)")
        folder = find_checkpoint(args.resume)
        stored = load_trainer_state(folder)["config"]
        if not any(o.split("=", 1)[0].strip() == "run_dir" for o in args.overrides):
            stored["run_dir"] = str(run_dir_of(folder))  # continue in the run folder the checkpoint is in
        cfg = TrainConfig.from_dict(apply_overrides(stored, args.overrides), where=str(folder / "trainer.pt"))
    elif args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        raise NewLLMError("give --config RECIPE.yaml (see configs/) or --resume RUN_DIR")
    results = train(cfg, resume=args.resume, data_dir=args.data_dir, tensorboard=not args.no_tensorboard,
                    force=args.force)
    print(dumps_json(results))
    return 0
