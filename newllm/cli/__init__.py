"""The `newllm` command. Each subcommand lives in its own module with `register(subparsers)`.

Bad input (`NewLLMError`) is printed as one line, `newllm: error: ...`, with exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from newllm.errors import NewLLMError

#: subcommand modules, in the order `newllm --help` lists them
COMMANDS = ["info", "generate", "train", "eval", "experiment", "memory", "trace"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="newllm", description="memory-augmented language models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"newllm.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NewLLMError as e:
        print(f"newllm: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"newllm: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
