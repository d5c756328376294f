"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    contiguous = {name: t.detach().contiguous() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp)))


def read_json(path: Path, missing: str) -> dict:
    """A JSON file that must exist; ``missing`` says what the user should give instead."""
    if not path.is_file():
        raise FlexMoEError(f"{str(path)!r} does not exist; {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FlexMoEError(f"{str(path)!r} is not valid JSON ({error}); it is damaged") from None
