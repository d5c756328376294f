"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


LOCK_FILE = ".lock"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this process: a second holder is refused until this one ends.

    An advisory ``flock`` on ``folder/.lock``, which the kernel releases when the holder exits,
    however it exits: a lock left by a killed process is never mistaken for a live one. The
    file names its holder (pid and host) for the message, and is removed on release.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    while True:
        handle = lock.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FlexMoEError(
                f"{folder} is in use by {holder}; wait for that run to end"
            ) from None
        if lock.exists() and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
            break  # the file we locked is still the lock (not one its last holder removed)
        handle.close()
    try:
        handle.truncate(0)
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def read_json(path: Path, missing: str, kind: type = dict) -> Any:
    """A JSON file holding a ``kind`` (an object by default) that must exist; ``missing`` says
    what the user should give instead."""
    if not path.is_file():
        raise FlexMoEError(f"{str(path)!r} does not exist; {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FlexMoEError(f"{str(path)!r} is not valid JSON ({error}); it is damaged") from None
    if not isinstance(data, kind):
        expected = "an object" if kind is dict else f"a {kind.__name__}"
        raise FlexMoEError(f"{str(path)!r} does not hold {expected}; it is damaged")
    return data
