"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError


def _umask() -> int:
    """The process's file-creation mask (Linux shows it; elsewhere it is read by setting it)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None], private: bool = False) -> Path:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it.

    A ``private`` file is its owner's alone (0600), as a client's data is; else it gets the
    mode ``open()`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    if not private:
        os.fchmod(fd, 0o666 & ~_umask())  # not mkstemp's owner-only 0600
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


def atomic_write_text(path: str | Path, text: str, private: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), private)


def private_folder(path: Path) -> Path:
    """``path``, made if missing, readable by its owner alone (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def make_private(folder: Path) -> None:
    """Make ``folder`` and everything in it its owner's alone (folders 0700, files 0600)."""
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o700 if path.is_dir() else 0o600)


LOCK_FILE = ".lock"


def check_writable(path: Path, folder: bool = True) -> None:
    """Refuse, in one line and before any work, a ``path`` this process could not write: a file
    where a folder goes (or the reverse), or a folder it may not write in. Creates nothing."""
    path = Path(path)
    kind = "folder" if folder else "file"
    if path.exists():
        if path.is_dir() != folder:
            raise FlexMoEError(f"{path} is not a {kind}; give the path of a {kind}")
        where = path if folder else path.parent
    else:
        where = next(parent for parent in path.parents if parent.exists())
        if not where.is_dir():
            raise FlexMoEError(f"cannot create {path}: {where} is a file, not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise FlexMoEError(f"cannot write {path}: this user may not write in {where}")


def check_new_folder(target: Path) -> None:
    """Refuse a ``target`` that exists, unless it is an empty folder."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FlexMoEError(f"{target} already exists; choose a new folder or remove it")


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """A scratch folder beside ``target`` that becomes ``target`` whole when the block ends
    without error, and is removed otherwise; an existing non-empty ``target`` is refused."""
    check_new_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    scratch.chmod(0o777 & ~_umask())  # as mkdir would make it, not mkdtemp's owner-only 0700
    try:
        yield scratch
        check_new_folder(target)  # another process may have written it meanwhile
        try:
            if target.exists():
                target.rmdir()
            os.replace(scratch, target)
        except OSError as error:
            raise FlexMoEError(f"cannot move the finished folder to {target}: {error}") from None
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)


@contextlib.contextmanager
def folder_lock(folder: Path, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``folder`` for this process: a second holder is refused until this one ends, or,
    given ``waiting``, told who holds it (``waiting(holder)``) and made to wait.

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
            if waiting is None:
                handle.close()
                raise FlexMoEError(
                    f"{folder} is in use by {holder}; wait for that run to end"
                ) from None
            waiting(holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
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
