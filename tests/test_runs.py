"""A run owns its output folder: one run at a time, no silent reuse, resumable only as itself."""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from flexmoe.cli import main
from flexmoe.client.state import StateStore
from flexmoe.errors import FlexMoEError
from flexmoe.federated.federation import check_out
from flexmoe.io import LOCK_FILE, atomic_folder, atomic_write_text, folder_lock
from flexmoe.results import Checkpoint, write_checkpoint
from flexmoe.runconfig import RunConfig


def saved_run(folder, **settings) -> RunConfig:
    """A folder holding run 'abc' at round 1 of ``settings``."""
    config = RunConfig(**settings)
    write_checkpoint(folder, Checkpoint(run_id="abc", config=asdict(config), round=1))
    (folder / "checkpoints").mkdir()
    for kind in ("shared", "strategy"):
        save_file(
            {"w": np.zeros(2)}, str(folder / "checkpoints" / f"{kind}-round-0001.safetensors")
        )
    return config


def test_a_folder_holding_a_run_is_not_reused_without_resume(tmp_path, capsys):
    saved_run(tmp_path, rounds=3)
    assert main(["run", "--out", str(tmp_path), "--method", "fedavg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds run abc (round 1 of 3, method flex)" in err
    assert f"continue it with --resume {tmp_path}" in err


def test_resume_refuses_other_settings_but_may_change_the_rounds_and_the_reply_timeout(
    tmp_path, capsys
):
    config = saved_run(tmp_path, rounds=3)
    check_out(tmp_path, config.updated({"rounds": 5, "reply-timeout": 600}), resume=True)
    assert main(["run", "--resume", str(tmp_path), "--lr", "0.5", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings (lr 0.001 -> 0.5; seed 0 -> 3)" in err
    assert "(only --rounds and --reply-timeout may change)" in err


def test_finished_results_without_a_checkpoint_are_not_overwritten(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(FlexMoEError, match="holds the results of an earlier run"):
        check_out(tmp_path, RunConfig(), resume=False)
    check_out(tmp_path / "empty", RunConfig(), resume=True)  # flwr run: nothing to continue


def test_a_held_folder_is_refused_and_released_after(tmp_path):
    with folder_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"process {os.getpid()} on ")
        with (
            pytest.raises(FlexMoEError, match=f"in use by process {os.getpid()}"),
            folder_lock(tmp_path),
        ):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def lock_holder(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process holding ``folder`` for ``seconds``; it touches ``finished`` just before
    it lets go."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from flexmoe.io import folder_lock\n"
         "with folder_lock(Path(sys.argv[1])):\n"
         "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n"
         "    (Path(sys.argv[1]) / 'finished').touch()",
         str(folder), str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_lock_held_by_a_killed_process_is_taken_over(tmp_path):
    holder = lock_holder(tmp_path, 60)
    with (
        pytest.raises(FlexMoEError, match=f"in use by process {holder.pid} on"),
        folder_lock(tmp_path),
    ):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # left behind, but no longer held
    with folder_lock(tmp_path):
        assert f"process {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()


def test_a_waiting_holder_is_told_who_holds_the_folder_and_gets_it_when_released(tmp_path):
    holder = lock_holder(tmp_path, 3)  # long enough to still hold it on a busy machine
    told = []
    with folder_lock(tmp_path, waiting=told.append):
        assert (tmp_path / "finished").exists()  # written by the first holder just before release
        assert f"process {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
    assert told == [f"process {holder.pid} on {socket.gethostname()}"]


def test_an_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    with atomic_folder(tmp_path / "done") as scratch:
        (scratch / "weights").write_text("w")
    assert [p.name for p in (tmp_path / "done").iterdir()] == ["weights"]
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "failed") as scratch:
        (scratch / "weights").write_text("partial")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]
    with pytest.raises(FlexMoEError, match="already exists"), atomic_folder(tmp_path / "done"):
        pass


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_atomic_writes_get_the_permissions_of_a_plain_write(
    tmp_path, umask, file_mode, folder_mode
):
    previous = os.umask(umask)
    try:
        (tmp_path / "plain.json").write_text("{}")
        atomic_write_text(tmp_path / "atomic.json", "{}")
        with atomic_folder(tmp_path / "folder"):
            pass
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {
        "plain.json": file_mode,
        "atomic.json": file_mode,
        "plain": folder_mode,
        "folder": folder_mode,
    }


class Saved:
    """Stands in for a FlexModel: save_pretrained writes a marker file."""

    def save_pretrained(self, folder, include_shared=False):
        folder.mkdir(parents=True)
        (folder / "personal.safetensors").write_text("x")


def test_pruning_removes_only_earlier_rounds_of_this_store(tmp_path):
    store = StateStore(tmp_path)
    for round_ in (7, 1, 2, 3):  # round 7: left by an interrupted attempt
        store.save(Saved(), round_, include_shared=False)
    assert store.rounds() == [2, 3, 7]
    assert store.latest(before=4) == tmp_path / "round-0003"
    assert not list(tmp_path.glob(".*"))


def test_resume_takes_neither_another_folder_nor_fewer_rounds_than_done(tmp_path, capsys):
    config = saved_run(tmp_path, rounds=3)
    assert main(["run", "--resume", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "give neither --config nor --out" in capsys.readouterr().err
    write_checkpoint(tmp_path, Checkpoint(run_id="abc", config=asdict(config), round=3))
    with pytest.raises(FlexMoEError, match="cannot resume to 2 rounds"):
        check_out(tmp_path, config.updated({"rounds": 2}), resume=True)


def test_pruning_keeps_as_many_rounds_as_asked(tmp_path):
    store = StateStore(tmp_path, keep=4)
    for round_ in (1, 2, 3, 4, 5):
        store.save(Saved(), round_, include_shared=False)
        assert store.rounds() == list(range(max(1, round_ - 3), round_ + 1))


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
