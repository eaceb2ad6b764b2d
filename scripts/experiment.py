#!/usr/bin/env python3
"""The unified experiment named in the seeds: `python3 scripts/experiment.py --models pythia infini
multi_memory hierarchical [--samples N --epochs E --lr LR] [--quick]`. Same as `newllm experiment`
(see `newllm experiment --help` and docs/experiment.md)."""
import sys

from newllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
