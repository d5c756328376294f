"""report.md and its plots for every results.json under a folder."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness.markdown import render_report
from benchmarks.harness.plots import write_plots
from benchmarks.harness.summary import PLOTS_DIR, load_runs
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_text
from flexmoe.results import RESULTS_FILE

REPORT_FILE = "report.md"


def write_report(directory: str | Path) -> Path:
    """Write ``directory``/report.md and its plots from every results.json under it."""
    directory = Path(directory)
    runs = load_runs(directory)
    if not runs:
        raise FlexMoEError(
            f"no {RESULTS_FILE} under {str(directory)!r}; run 'python -m benchmarks.bench' first"
        )
    write_plots(runs, directory / PLOTS_DIR)
    return atomic_write_text(directory / REPORT_FILE, render_report(runs))
