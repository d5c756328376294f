"""Ctrl-C and SIGTERM stop a real run within seconds, in one line, and leave it resumable."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from flexmoe.cache import CACHE_ENV
from flexmoe.cli import main
from flexmoe.results import CHECKPOINT_FILE, RESULTS_FILE, read_checkpoint, read_results

pytestmark = pytest.mark.slow

SETTINGS = [
    "--clients", "2", "--rounds", "4", "--local-steps", "2", "--max-train", "8",
    "--max-test", "4", "--max-new-tokens", "4", "--diagnostics", "false",
]  # fmt: skip
STOP_WITHIN_S = 20


def wait_for_round(out, process, round_: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if (out / CHECKPOINT_FILE).is_file() and read_checkpoint(out).round >= round_:
            return
        time.sleep(0.2)
    pytest.fail(f"no round {round_} within {timeout_s} s")


@pytest.mark.parametrize(
    ("signum", "word"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")]
)
def test_a_signal_stops_a_run_in_seconds_in_one_line_and_it_resumes(
    tmp_path, monkeypatch, signum, word
):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "flexmoe", "run", "--out", str(out), *SETTINGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, CACHE_ENV: str(tmp_path / "cache")},
    )
    wait_for_round(out, process, 1)
    family = psutil.Process(process.pid).children(recursive=True)
    assert family  # Ray's processes, the reaper's watchdog
    process.send_signal(signum)
    sent = time.monotonic()
    _, err = process.communicate(timeout=120)
    assert time.monotonic() - sent < STOP_WITHIN_S
    assert process.returncode == 128 + signum
    assert err.strip().splitlines()[-1] == f"flexmoe: {word}"
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.info for p in alive]
    saved = read_checkpoint(out).round  # intact, and the run goes on from it
    assert 1 <= saved < 4
    assert main(["run", "--resume", str(out)]) == 0
    assert read_results(out / RESULTS_FILE).rounds == 4
