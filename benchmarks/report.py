"""``python -m benchmarks.report DIR``: report.md and plots for every results.json under DIR."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness.report import write_report
from flexmoe.cli import entry, execute
from flexmoe.io import check_writable


def build_parser() -> argparse.ArgumentParser:
    report = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Read every results.json under DIR and write DIR/report.md (each arm's "
        "means and standard deviations over seeds, paired comparisons with bootstrap intervals "
        "and the paper's claims judged by them, per-client scores, knowledge loss, traffic, the "
        "client-count ablation) and PNG plots under DIR/plots.",
    )
    report.add_argument("directory", type=Path, metavar="DIR")
    report.set_defaults(command=run_report, loads_models=False, command_parser=report)
    return report


def run_report(args: argparse.Namespace) -> None:
    """Write report.md and plots for every results.json under a folder."""
    check_writable(args.directory)
    print(f"report written to {write_report(args.directory)}")


def main(argv: Sequence[str] | None = None) -> int:
    return execute(build_parser(), argv)


if __name__ == "__main__":
    entry(main())
