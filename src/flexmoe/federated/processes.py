"""Supervising a local deployment's processes: each launched in its own process group with a log
file, waited on while all the others stay up, and stopped together."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flexmoe.errors import FlexMoEError
from flexmoe.federated.reaper import descendants_of, kill_if_alive

LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 5.0


@dataclass
class Process:
    """One launched process, its role and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class Supervisor:
    """The processes launched into ``logs`` with environment ``env``, and waiting on them."""

    logs: Path
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    def launch(self, name: str, command: list[str]) -> Process:
        """Start ``command`` in its own process group, its output in ``logs/<name>.log``."""
        log = self.logs / f"{name}.log"
        with log.open("wb") as sink:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def check_alive(self, skip: Process | None = None) -> None:
        """Raise if any launched process other than ``skip`` has exited."""
        for process in self.processes:
            if process is not skip and process.popen.poll() is not None:
                raise died(process)

    def wait_until(self, ready: Callable[[], bool], failure: str, deadline: float) -> None:
        """Poll ``ready`` while every launched process stays up and the deadline holds."""
        while True:
            self.check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise FlexMoEError(f"{failure}; see {self.logs}")
            time.sleep(0.2)

    def wait_for_file(self, path: Path, deadline: float) -> None:
        """Wait until ``path`` exists (a node worker writes its key once it listens)."""
        self.wait_until(path.exists, f"{path} did not appear", deadline)

    def wait_for_port(self, port: int, deadline: float) -> None:
        """Wait until something accepts connections on the loopback ``port``."""

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex((LOOPBACK, port)) == 0

        self.wait_until(listening, f"nothing listens on {LOOPBACK}:{port}", deadline)

    def wait_for_exit(self, process: Process, deadline: float) -> None:
        """Wait for ``process`` to exit while all the others stay up and the deadline holds."""
        while process.popen.poll() is None:
            self.check_alive(skip=process)
            if time.monotonic() > deadline:
                raise FlexMoEError(f"the Flower run timed out; see {process.log}")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_all(self.processes)


def died(process: Process) -> FlexMoEError:
    """The error that names a process that exited and its log."""
    return FlexMoEError(
        f"{process.name} exited with code {process.popen.returncode}; see {process.log}"
    )


def stop_all(processes: Sequence[Process]) -> None:
    """Terminate every process group (and stray descendants), then kill what remains."""
    descendants = descendants_of(p.popen.pid for p in processes)
    for process in processes:
        _signal_group(process.popen, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        _signal_group(process.popen, signal.SIGKILL)
        process.popen.wait()
    kill_if_alive(descendants)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports that are free now (the OS picks them)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]


def console_script(name: str) -> list[str]:
    """The path of a console script (Flower's) installed next to this Python."""
    script = Path(sys.executable).parent / name
    if not script.exists():
        raise FlexMoEError(f"{script} not found: install Flower with `pip install 'flwr>=1.42'`")
    return [str(script)]


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit within the block, so `finally` blocks stop the processes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group that ``popen`` leads, if it still exists."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, sig)
