"""Processes that die with the one that started them, even when it is killed with SIGKILL.

A simulation starts Ray, whose GCS server, raylet, agents and workers are not all children of
the process that starts them, and some of them outlive a killed driver by minutes. Every process
started inside ``reaped()`` carries a token in its environment. A small watchdog holds the read
end of a pipe from the starter; while the pipe is open it notes, every second, the processes
that carry the token and all their descendants (Ray's agents do not inherit the environment, but
they are the raylet's children); when the pipe closes (the starter ended, however it ended) it
kills every one of them still alive. Linux only (it reads /proc); elsewhere it finds nothing.

    python -m flexmoe.federated.reaper TOKEN SPARED_PID   (run by reaped(), not by hand)
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

TOKEN_ENV = "FLEXMOE_REAPER_TOKEN"
WATCH_INTERVAL_S = 1.0
SWEEPS = 5  # processes may still be starting when the pipe closes
SWEEP_INTERVAL_S = 0.5

Processes = dict[int, int]  # pid -> start time (a pid may be reused; the pair may not)


@contextlib.contextmanager
def reaped() -> Iterator[None]:
    """Every process started inside this block is killed when the block or this process ends."""
    token = uuid.uuid4().hex
    read_end, write_end = os.pipe()
    watchdog = subprocess.Popen(
        [sys.executable, "-m", __name__, token, str(os.getpid())],
        stdin=read_end,
        start_new_session=True,  # not in our process group: a signal to the group spares it
    )
    os.close(read_end)
    os.environ[TOKEN_ENV] = token
    try:
        yield
    finally:
        os.environ.pop(TOKEN_ENV, None)
        os.close(write_end)
        watchdog.wait()


def process_table() -> dict[int, tuple[int, int]]:
    """Every visible pid with its parent pid and start time, from /proc/<pid>/stat."""
    table = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat_file.parent.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants_of(roots: Iterable[int]) -> Processes:
    """The descendants of ``roots``, each with its start time."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: Processes = {}
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found[child] = table[child][1]
                stack.append(child)
    return found


def kill_if_alive(processes: Processes) -> None:
    """SIGKILL each process that is still the one noted (same pid, same start time)."""
    alive = process_table()
    for pid, started in processes.items():
        if pid in alive and alive[pid][1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def members(token: str, spared: int) -> Processes:
    """The processes that carry ``token`` and their descendants, but ``spared`` and this one."""
    entry = f"{TOKEN_ENV}={token}".encode()
    carriers = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if entry in environ.read_bytes().split(b"\0"):
                carriers.append(int(environ.parent.name))
    table = process_table()
    found = {pid: table[pid][1] for pid in carriers if pid in table}
    found.update(descendants_of(carriers))
    for pid in (spared, os.getpid()):
        found.pop(pid, None)
    return found


def main(token: str, spared: str) -> None:
    noted: Processes = {}
    while True:
        noted.update(members(token, int(spared)))
        readable, _, _ = select.select([sys.stdin], [], [], WATCH_INTERVAL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break  # end of file: the starter closed the pipe, or died
    for _ in range(SWEEPS):
        noted.update(members(token, int(spared)))
        kill_if_alive(noted)
        time.sleep(SWEEP_INTERVAL_S)


if __name__ == "__main__":
    main(*sys.argv[1:3])
