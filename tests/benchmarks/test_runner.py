"""Running a matrix's cells as parallel processes: failures, skipping, resuming, stopping."""

import json
import sys
from pathlib import Path

import pytest

from benchmarks import bench
from benchmarks.harness import runner
from benchmarks.harness.matrix import MATRICES, select
from benchmarks.harness.report import REPORT_FILE
from benchmarks.harness.runner import describe, failures, run_cells
from flexmoe.results import (
    Checkpoint,
    write_checkpoint,
)
from tests.benchmarks.fakes import cell_results, fake_command, fake_results, table_row, write_run

pytestmark = pytest.mark.slow  # every cell runs as a process


def test_cells_run_in_parallel_and_a_failure_does_not_stop_the_others(tmp_path):
    cells = select(MATRICES["smoke"], ["flex", "fedavg"], [0, 1]).cells()
    lines: list[str] = []
    outcomes = run_cells(tmp_path, cells, jobs=2, command=fake_command("fedavg"), echo=lines.append)
    assert [o.cell.name for o in outcomes] == [c.name for c in cells]
    assert [o.status for o in outcomes] == ["done", "done", "failed", "failed"]
    assert (tmp_path / "pathological" / "flex" / "seed1" / "results.json").is_file()
    log = tmp_path / "pathological" / "fedavg" / "seed0.log"
    assert "peak" in log.read_text()
    assert {o.log for o in failures(outcomes)} == {log, log.with_name("seed1.log")}
    assert f"pathological/fedavg/seed0  exit status 3; log: {log}" in describe(outcomes[2])
    assert len(lines) == 4
    assert (tmp_path / "pathological" / "flex" / "peaks" / "2").exists()  # two ran at once


def test_finished_cells_are_skipped_and_stale_ones_refused(tmp_path):
    cells = select(MATRICES["smoke"], ["flex"], [0, 1, 2]).cells()
    write_run(tmp_path / cells[0].name, cell_results(cells[0], [99.0]))
    write_run(tmp_path / cells[1].name, fake_results("flex", 1, [99.0], rounds=7))
    outcomes = run_cells(tmp_path, cells, jobs=1, command=fake_command(), echo=lambda _: None)
    assert [o.status for o in outcomes] == ["skipped", "failed", "done"]
    assert "rounds 7 != 2" in outcomes[1].reason
    kept = json.loads((tmp_path / cells[0].name / "results.json").read_text())
    assert kept["mean_rouge_l"] == 99.0
    assert not (tmp_path / "pathological" / "flex" / "seed0.log").exists()


def test_bench_command_reports_failed_cells_writes_the_report_and_exits_nonzero(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(runner, "flexmoe_command", fake_command("fedavg"))
    argv = ["--matrix", "smoke", "--seeds", "0,1", "--out", str(tmp_path), "--jobs", "2"]
    assert bench.main([*argv, "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 of 6 cells failed" in err
    assert str(tmp_path / "smoke" / "pathological" / "fedavg" / "seed1.log") in err
    report = (tmp_path / "smoke" / REPORT_FILE).read_text()
    assert table_row(report, "flex")[1] == "2" and "fedavg |" not in report
    kept = tmp_path / "smoke" / "pathological" / "flex" / "seed0.provenance.json"
    recorded = json.loads(kept.read_text())
    (start,) = recorded["starts"]
    assert recorded["arm"] == "flex" and start["torch"] and start["cores"] >= 1
    assert len(start["commit"]) == 40
    assert table_row(report, "pathological/flex/seed0")[-1].startswith(start["commit"][:7])
    assert bench.main([*argv, "--rounds", "1", "--methods", "flex,fedavg-full"]) == 0  # all done
    assert bench.main(["--matrix", "smoke", "--list", "--seeds", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("pathological/fedavg-full/seed0")


def test_an_interrupted_cell_is_resumed_with_its_own_settings(tmp_path):
    from benchmarks.harness.runner import flexmoe_command

    cell = select(MATRICES["smoke"], ["flex"], [0]).cells()[0]
    assert flexmoe_command(cell, tmp_path)[3:6] == ["run", "--out", str(tmp_path)]
    write_checkpoint(tmp_path, Checkpoint(run_id="r", config=cell.config().to_record()))
    command = flexmoe_command(cell, tmp_path)
    assert command[3:6] == ["run", "--resume", str(tmp_path)]
    assert command[6:] == [*cell.arguments(), "--reply-timeout=0.0"]  # not the saved wait


def test_an_interrupted_cell_with_other_settings_is_not_resumed(tmp_path):
    cell = select(MATRICES["smoke"], ["flex"], [0]).cells()[0]
    other = cell.config().updated({"rounds": cell.config().federation.rounds + 1})
    write_checkpoint(tmp_path / cell.name, Checkpoint(run_id="r", config=other.to_record()))
    [outcome] = run_cells(tmp_path, [cell], jobs=1, command=fake_command(), echo=lambda _: None)
    assert outcome.status == "failed" and "rounds 3 -> 2" in outcome.reason


def test_an_interrupted_cell_whose_server_waited_otherwise_is_resumed(tmp_path):
    cell = select(MATRICES["smoke"], ["flex"], [0]).cells()[0]
    waited = cell.config().updated({"reply-timeout": 3600.0})
    write_checkpoint(tmp_path / cell.name, Checkpoint(run_id="r", config=waited.to_record()))
    runner.log_path(tmp_path, cell).write_text("round 1 of the first attempt\n")
    [outcome] = run_cells(tmp_path, [cell], jobs=1, command=fake_command(), echo=lambda _: None)
    assert outcome.status == "done"
    first, resumed = outcome.log.read_text().split(f"--- bench: resuming {cell.name} ---")
    assert "first attempt" in first and "peak" in resumed  # the earlier log is kept


def test_a_cell_that_fails_on_resuming_says_how_to_run_it_from_the_start(tmp_path):
    cell = select(MATRICES["smoke"], ["fedavg"], [0]).cells()[0]
    write_checkpoint(tmp_path / cell.name, Checkpoint(run_id="r", config=cell.config().to_record()))
    [outcome] = run_cells(tmp_path, [cell], jobs=1, command=fake_command("fedavg"), echo=print)
    assert outcome.reason == (
        f"exit status 3 on resuming it (to run it from the start, delete {tmp_path / cell.name})"
    )


def test_bench_runs_every_cell_on_the_model_it_is_given(capsys):
    assert bench.main(["--matrix", "smoke", "--list", "--model", "smol-moe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("--model smol-moe" in line for line in lines)


KILLED_BENCH = """
import sys
from benchmarks import bench
from benchmarks.harness import runner
runner.flexmoe_command = lambda cell, out: ["sleep", "120"]  # a cell that takes its time
bench.main(["--matrix", "smoke", "--methods", "flex", "--seeds", "0", "--out", sys.argv[1]])
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc")
def test_a_killed_bench_takes_its_running_cells_with_it(tmp_path):
    import signal
    import subprocess
    import time

    from flexmoe.federated.reaper import descendants_of, process_table

    root = Path(bench.__file__).parents[1]  # where `benchmarks` imports from
    process = subprocess.Popen([sys.executable, "-c", KILLED_BENCH, str(tmp_path)], cwd=root)
    deadline = time.monotonic() + 60
    while not (cells := descendants_of([process.pid])) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # the watchdog notes the processes every second
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 15
    while set(cells) & set(process_table()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cells and not set(cells) & set(process_table())
