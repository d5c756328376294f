"""The ``flexmoe`` command line.

Building the parser imports no torch, transformers or peft: each command imports what it needs
when it runs, so ``flexmoe --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from flexmoe.cli import models, run
from flexmoe.errors import FlexMoEError, Terminated


def main(argv: Sequence[str] | None = None) -> int:
    return execute(build_parser(), argv)


def execute(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Run the command ``parser`` parses from ``argv``: its exit status, with an error, a
    Ctrl-C or a SIGTERM as one line on stderr."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser, whose usage shows what it takes
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    with _signals_stop():
        try:
            if args.loads_models:  # our own progress bars speak for long work; these are noise
                os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
                os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
                if "transformers" in sys.modules:  # called in-process: too late for the variables
                    from flexmoe.models.loading import quiet_transformers

                    quiet_transformers()
            args.command(args)
        except FlexMoEError as error:
            print(f"flexmoe: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # the system refused a read or write: say which, and why
            where = f"{error.filename}: " if error.filename else ""
            print(f"flexmoe: error: {where}{error.strerror or error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # on a line of its own, after any progress bar's
            print("\nflexmoe: interrupted", file=sys.stderr)
            return 128 + signal.SIGINT
        except Terminated:
            print("\nflexmoe: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
    return 0


def entry(code: int | None = None) -> None:
    """The ``flexmoe`` command: ``main()`` (or an exit status already ``code``), then exit at
    once, even where an interrupted run left a runtime's thread waiting for replies that will
    never come (Flower's ServerApp thread), which a normal exit would wait for forever."""
    code = main() if code is None else code
    sys.stdout.flush()
    sys.stderr.flush()
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        os._exit(code)
    sys.exit(code)


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM ``Terminated`` while the block runs (in
    the main thread), and either silences logging first: once the user has stopped a command,
    what a runtime's threads log as it goes down is noise."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        logging.disable(logging.CRITICAL)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        logging.disable(logging.NOTSET)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexmoe",
        description="Personalized federated instruction tuning of MoE LLMs with FLEx.",
    )
    parser.set_defaults(loads_models=False)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for module in (run, models):
        module.add_commands(commands)
    name_command_parsers(parser)
    return parser


def name_command_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every command's parser to its own arguments as ``command_parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.set_defaults(command_parser=command)
                name_command_parsers(command)


if __name__ == "__main__":
    entry()
