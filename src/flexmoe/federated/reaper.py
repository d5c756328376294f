"""Processes that die with the one that started them, even when it is killed with SIGKILL.

A simulation starts Ray, whose GCS server, raylet, agents and workers are not all children of
the process that starts them, and some of them outlive a killed driver by minutes. Every process
started inside ``reaped()`` carries a token in its environment; a small watchdog process holds
the read end of a pipe from this one, and when the pipe closes (this process ended, however it
ended) it kills every process that carries the token. Linux only (it reads /proc); elsewhere the
watchdog finds nothing to do.

    python -m flexmoe.federated.reaper TOKEN SPARED_PID   (run by reaped(), not by hand)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

TOKEN_ENV = "FLEXMOE_REAPER_TOKEN"
SWEEPS = 5  # processes may still be starting when the pipe closes
SWEEP_INTERVAL_S = 0.5


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


def carriers(token: str) -> list[int]:
    """Pids of the live processes whose environment carries ``token``."""
    entry = f"{TOKEN_ENV}={token}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if entry in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


def reap(token: str, spared: int) -> None:
    """Kill every process carrying ``token`` but ``spared`` (the starter, when it lives on)."""
    for _ in range(SWEEPS):
        for pid in carriers(token):
            if pid not in (spared, os.getpid()):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(SWEEP_INTERVAL_S)


def main(token: str, spared: str) -> None:
    sys.stdin.buffer.read()  # returns at end of file: the starter closed the pipe, or died
    reap(token, int(spared))


if __name__ == "__main__":
    main(*sys.argv[1:3])
