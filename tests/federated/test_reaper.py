"""The reaper: no process a run started outlives it, even when the run is killed."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes started, killed and reaped


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


STARTER = """
import subprocess, sys, time
from flexmoe.federated.reaper import reaped
with reaped():
    carrier = subprocess.Popen(["sleep", "120"], start_new_session=True)
    # a grandchild with a clean environment, as Ray's agents are started by the raylet
    shell = "env -i sleep 120 & echo $!; wait"
    parent = subprocess.Popen(["sh", "-c", shell], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    print(carrier.pid, parent.stdout.readline().strip(), flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc")
def test_processes_started_in_a_killed_run_die_with_it():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    orphans = [int(pid) for pid in starter.stdout.readline().split()]
    assert len(orphans) == 2 and all(alive(pid) for pid in orphans)
    time.sleep(1.5)  # the watchdog notes the run's processes every second
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    assert all(wait_gone(pid) for pid in orphans)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc")
def test_processes_left_at_the_end_of_the_block_are_reaped_and_the_starter_spared():
    from flexmoe.federated.reaper import reaped

    with reaped():
        orphan = subprocess.Popen(["sleep", "120"], start_new_session=True)
    assert wait_gone(orphan.pid)
    orphan.wait()
