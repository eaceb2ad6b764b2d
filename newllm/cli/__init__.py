"""The `newllm` command. Each subcommand lives in its own module with `register(subparsers)`.

Bad input (`NewLLMError`) and a failed file operation (`OSError`: a missing file, a full disk, a
read-only folder, no permission) are printed as one line, `newllm: error: ...`, with exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from newllm.errors import NewLLMError

#: subcommand modules, in the order `newllm --help` lists them
COMMANDS = ["info", "generate", "train", "eval", "experiment", "memory", "trace", "retrofit"]


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
    except OSError as e:  # a full disk, a read-only folder, no permission, a folder given for a file: one line
        print(f"newllm: error: {os_error_line(e)}", file=sys.stderr)
        return 2


def os_error_line(e: OSError) -> str:
    """"PATH: No space left on device" for an OSError (both paths of a failed rename)."""
    why = e.strerror or str(e) or type(e).__name__
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {why}" if paths else why


if __name__ == "__main__":
    sys.exit(main())
