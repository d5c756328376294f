"""A node-local worker that keeps a client's base model loaded from message to message.

A Flower deployment starts a new ClientApp process for every message, which would import torch,
read the client's data and load the base model for every train and evaluate request: minutes per
round for a model of billions of parameters. The worker is a long-lived process beside the
SuperNode that holds all of that. The ClientApp of each message forwards its job to the worker
over a Unix socket on node-local disk and returns the worker's reply; nothing else changes.

Start one per SuperNode with ``flexmoe node-worker --socket PATH`` and name it in the SuperNode's
node config (``worker-socket="PATH"``); ``flexmoe deploy-local`` does both. The worker writes a
random key beside the socket (``PATH.key``, readable by its user only) and accepts only
connections that prove they hold it.
"""

from __future__ import annotations

import os
import pickle
import secrets
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write

MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux


@dataclass(frozen=True)
class Job:
    """One message's work, as the ClientApp hands it to whoever runs it."""

    kind: str  # "train" or "evaluate"
    settings: Any  # Settings
    partition_id: int
    state_dir: Path
    threads: int
    instructions: Any  # RoundInstructions
    shared: dict  # the global shared parameters
    own_data: str | None = None  # the node's own data file, when it names one


def key_path(socket: Path) -> Path:
    return socket.with_name(socket.name + ".key")


def submit(socket: Path, job: Job) -> Any:
    """Run ``job`` on the worker listening on ``socket``; its reply, or its error raised here."""
    try:
        key = key_path(socket).read_bytes()
        connection = Client(str(socket), family="AF_UNIX", authkey=key)
    except (FileNotFoundError, ConnectionRefusedError):
        raise FlexMoEError(
            f"no flexmoe node worker listens on {socket}; start one on this node with "
            f"`flexmoe node-worker --socket {socket}`"
        ) from None
    with connection:
        _send(connection, job)
        status, value = _receive(connection)
    if status == "error":
        raise FlexMoEError(value)
    return value


def serve(socket: Path, run: Any) -> None:
    """Answer jobs on ``socket`` with ``run(job)``, one at a time, until SIGTERM or SIGINT."""
    socket = socket.resolve()
    if len(str(socket)) > MAX_SOCKET_PATH:
        raise FlexMoEError(
            f"socket path {socket} is longer than {MAX_SOCKET_PATH} characters, the limit of "
            "Unix sockets; give a shorter one"
        )
    socket.parent.mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)  # left by a killed worker
    key = secrets.token_bytes(32)
    with Listener(str(socket), family="AF_UNIX", authkey=key) as listener:
        os.chmod(socket, 0o600)
        atomic_write(key_path(socket), lambda scratch: scratch.write_bytes(key), private=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"flexmoe node worker: listening on {socket}", flush=True)
        try:
            while True:
                _answer(listener, run)
        finally:
            key_path(socket).unlink(missing_ok=True)


def _answer(listener: Listener, run: Any) -> None:
    try:
        connection: Connection = listener.accept()
        with connection:
            job = _receive(connection)
            try:
                reply = ("ok", run(job))
            except FlexMoEError as error:
                reply = ("error", str(error))
            except Exception as error:  # reported to the server as the client's failure
                traceback.print_exc()
                reply = ("error", f"{type(error).__name__}: {error}")
            _send(connection, reply)
    except (AuthenticationError, EOFError, OSError) as error:  # a caller without the key,
        print(f"flexmoe node worker: dropped a connection ({error!r})", flush=True)  # or gone


def _send(connection: Connection, value: Any) -> None:
    # plain pickle: multiprocessing's own would hand tensors over as shared-memory handles
    connection.send_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(connection: Connection) -> Any:
    return pickle.loads(connection.recv_bytes())
