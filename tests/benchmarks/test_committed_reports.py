"""Every committed benchmark report is what ``python -m benchmarks.report`` makes of its JSON
files today."""

import subprocess

import pytest

from benchmarks.harness.markdown import render_report
from benchmarks.harness.summary import load_runs
from tests import ROOT


def committed_reports() -> list[str]:
    """The report.md files git tracks under benchmarks/results (none outside a git checkout)."""
    listed = subprocess.run(
        ["git", "ls-files", "benchmarks/results/**/report.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return listed.stdout.split() if listed.returncode == 0 else []


@pytest.mark.parametrize("report", committed_reports())
def test_a_committed_report_is_regenerated_byte_for_byte_from_its_json(report):
    folder = (ROOT / report).parent
    assert render_report(load_runs(folder)) == (ROOT / report).read_text(encoding="utf-8"), (
        f"{report} is stale: run 'python -m benchmarks.report {folder.relative_to(ROOT)}' and "
        "commit it"
    )
