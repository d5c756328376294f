"""Files and folders: locks held by live and killed processes, atomic writes and folders."""

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from flexmoe.errors import FlexMoEError
from flexmoe.io import LOCK_FILE, atomic_folder, atomic_write_text, folder_lock


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


@pytest.mark.slow
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


@pytest.mark.slow
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
