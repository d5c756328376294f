"""Where a model runs and in what precision, by name: ``--device`` and ``--dtype``.

Plain names without torch, so that settings can be checked cheaply; ``flexmoe.hardware``
resolves them on the machine at hand.
"""

from __future__ import annotations

import re

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device name, or None."""
    return None if _DEVICE.fullmatch(name) else f"must be {DEVICE_FORMS}"


def dtype_problem(name: str) -> str | None:
    """Why ``name`` is not a dtype name, or None."""
    return None if name in DTYPE_NAMES else f"must be one of: {', '.join(DTYPE_NAMES)}"


def cuda_index(name: str) -> int | None:
    """N of ``cuda:N``; None for any other device name."""
    kind, _, index = name.partition(":")
    return int(index) if kind == "cuda" and index else None
