"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
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
    """Hold ``folder`` for this process: a second holder is refused until this one exits.

    The lock file names its holder (pid and host); a lock whose process is gone (on this host)
    is stale and taken over. It is created whole (written aside, then hard-linked into place),
    so no one ever reads a half-written lock.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    holder = {"pid": os.getpid(), "host": socket.gethostname()}
    fd, aside = tempfile.mkstemp(dir=folder, prefix=".lock.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(holder, handle)
    try:
        while True:
            try:
                os.link(aside, lock)
                break
            except FileExistsError:
                other = _lock_holder(lock)
                if other is not None and _alive(other):
                    raise FlexMoEError(
                        f"{folder} is in use by process {other['pid']} on {other['host']}; "
                        f"wait for it to end (or, if that process is gone, delete {lock})"
                    ) from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
    finally:
        os.unlink(aside)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) and {"pid", "host"} <= set(holder) else None
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the lock's holder still runs; a holder on another host is taken to."""
    if holder["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
