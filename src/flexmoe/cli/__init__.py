"""The ``flexmoe`` command line.

Building the parser imports no torch, transformers or peft: each command imports what it needs
when it runs, so ``flexmoe --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from flexmoe.cli import bench, models, run
from flexmoe.errors import FlexMoEError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.loads_models:  # our own progress bars speak for long work; these are noise
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            if "transformers" in sys.modules:  # called in-process: too late for the variables
                from flexmoe.loading import quiet_transformers

                quiet_transformers()
        args.command(args)
    except FlexMoEError as error:
        print(f"flexmoe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexmoe: interrupted", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexmoe",
        description="Personalized federated instruction tuning of MoE LLMs with FLEx.",
    )
    parser.set_defaults(loads_models=False)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for module in (run, models, bench):
        module.add_commands(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
