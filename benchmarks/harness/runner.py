"""Running a matrix's cells as parallel ``flexmoe run`` processes, skipping finished ones."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks.harness.matrix import Cell
from benchmarks.harness.summary import (
    PREDICTIONS_FILE,
    provenance_path,
    read_provenance,
    write_predictions,
)
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_text
from flexmoe.results import (
    CHECKPOINT_FILE,
    RESULTS_FILE,
    RunResults,
    read_checkpoint,
    read_results,
)
from flexmoe.schema import snake
from flexmoe.settings import RUNTIME_SETTINGS, Settings

CommandBuilder = Callable[[Cell, Path], list[str]]


def flexmoe_command(cell: Cell, out: Path) -> list[str]:
    """``flexmoe run`` for ``cell`` in this interpreter; a cell interrupted earlier (its
    checkpoint is there) is resumed, with the same settings and the cell's runtime ones (a resumed
    run keeps its saved values of those, which an older default may have set)."""
    run = [sys.executable, "-m", "flexmoe", "run"]
    if not (out / CHECKPOINT_FILE).is_file():
        return [*run, "--out", str(out), *cell.arguments()]
    config = cell.config()
    runtime = [f"--{name}={config.to_flat()[name]}" for name in RUNTIME_SETTINGS]
    return [*run, "--resume", str(out), *cell.arguments(), *runtime]


@dataclass(frozen=True)
class Outcome:
    """What happened to one cell: ``done``, ``skipped`` (finished earlier) or ``failed``."""

    cell: Cell
    status: str
    log: Path
    wall_s: float = 0.0
    reason: str = ""


def cell_dir(root: Path, cell: Cell) -> Path:
    return root / cell.name


def log_path(root: Path, cell: Cell) -> Path:
    """The log of a cell, beside its output folder (``.../seed0.log``)."""
    out = cell_dir(root, cell)
    return out.with_name(f"{out.name}.log")


def stale_settings(results: RunResults, cell: Cell) -> list[str]:
    """Settings of ``cell`` that a finished run's results.json disagrees with."""
    saved, config = results.config or {}, cell.config().to_record()
    wanted = {name: config[name] for name in (snake(k) for k in cell.overrides)}
    return [
        f"{key} {saved[key]!r} != {value!r}"
        for key, value in sorted(wanted.items())
        if key in saved and saved[key] != value
    ]


def run_cell(root: Path, cell: Cell, command: CommandBuilder | None = None) -> Outcome:
    """Run one cell (``flexmoe run`` unless ``command`` says otherwise) unless it finished."""
    out, log = cell_dir(root, cell), log_path(root, cell)
    finished = out / RESULTS_FILE
    if finished.is_file():
        stale = stale_settings(read_results(finished), cell)
        if stale:
            reason = f"{finished} was made with other settings ({', '.join(stale)})"
            return Outcome(cell, "failed", log, reason=reason)
        keep_predictions(out)
        return Outcome(cell, "skipped", log)
    interrupted = out / CHECKPOINT_FILE
    resuming = interrupted.is_file()
    if resuming:  # resumed only as exactly this cell, rounds included
        changed = Settings().updated(read_checkpoint(out).config).differences(cell.config())
        changed = {k: v for k, v in changed.items() if k not in RUNTIME_SETTINGS}
        if changed:
            listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            reason = f"{interrupted} was started with other settings ({listed})"
            return Outcome(cell, "failed", log, reason=reason)
    log.parent.mkdir(parents=True, exist_ok=True)
    record_start(root, cell)
    started = time.perf_counter()
    with log.open("a" if resuming else "w") as handle:  # a resumed cell keeps its earlier log
        if resuming:
            handle.write(f"\n--- bench: resuming {cell.name} ---\n")
            handle.flush()
        code = subprocess.run(
            (command or flexmoe_command)(cell, out),
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    wall = time.perf_counter() - started
    if code != 0 or not finished.is_file():
        reason = f"exit status {code}"
        if resuming:  # e.g. its checkpoint's files did not come with it to this machine
            reason += f" on resuming it (to run it from the start, delete {out})"
        return Outcome(cell, "failed", log, wall, reason)
    keep_predictions(out)
    return Outcome(cell, "done", log, wall)


def record_start(root: Path, cell: Cell) -> None:
    """Add this start of a cell (its first, or a resumption) to its provenance file beside its
    folder (``.../seed0.provenance.json``, as its log): the arm it runs, and per start the commit
    the code ran at, whether the code had uncommitted changes, the machine and the libraries."""
    path = provenance_path(cell_dir(root, cell))
    starts = read_provenance(cell_dir(root, cell))[1]
    starts.append(
        {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            **_commit(),
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            **{name: metadata.version(name) for name in ("torch", "transformers", "flwr")},
        }
    )
    arm = cell.arm or str(cell.overrides["method"])
    atomic_write_text(path, json.dumps({"arm": arm, "starts": starts}, indent=1) + "\n")


def _commit() -> dict[str, object]:
    """The repository's commit and whether tracked files differ from it (None outside git)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # the code's changes: results written since the last commit are not the code
    code = ("src", "benchmarks", ":!benchmarks/results", "pyproject.toml")
    changes = git("status", "--porcelain", "--untracked-files=no", "--", *code)
    return {"commit": commit, "uncommitted_changes": None if changes is None else bool(changes)}


def _cpu_name() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    ):
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def keep_predictions(out: Path) -> None:
    """Write what the report and its paired comparisons read of a finished cell's clients'
    predictions (``predictions.jsonl``), unless it is there."""
    if not (out / PREDICTIONS_FILE).is_file():
        write_predictions(out)


def default_jobs() -> int:
    return max(1, (os.cpu_count() or 1) // 2)


def run_cells(
    root: Path,
    cells: Sequence[Cell],
    jobs: int | None = None,
    command: CommandBuilder | None = None,
    echo: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run ``cells`` in up to ``jobs`` parallel processes; outcomes in the order of ``cells``."""
    jobs = jobs or default_jobs()
    if jobs < 1:
        raise FlexMoEError(f"--jobs must be at least 1, got {jobs}")

    def one(cell: Cell) -> Outcome:
        outcome = run_cell(root, cell, command)
        echo(describe(outcome))
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, cells))


def describe(outcome: Outcome) -> str:
    """A one-line account of a cell's outcome."""
    line = f"{outcome.status:>7}  {outcome.cell.name}"
    if outcome.status == "done":
        line += f"  ({outcome.wall_s:.0f} s)"
    if outcome.status == "failed":
        line += f"  {outcome.reason}; log: {outcome.log}"
    return line


def failures(outcomes: Iterable[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status == "failed"]
