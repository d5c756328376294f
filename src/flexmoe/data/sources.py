"""One entry point for every data source: a local file or Natural Instructions v1."""

from __future__ import annotations

from pathlib import Path

from flexmoe.data.natural_instructions import load_natural_instructions
from flexmoe.data.records import InstructionExample, load_instructions

NATURAL_INSTRUCTIONS = "natural-instructions"
NATURAL_INSTRUCTIONS_NAMES = ("ni", NATURAL_INSTRUCTIONS)  # `ni` is the name the CLI documents


def load_dataset(
    source: str | Path, max_per_task: int | None = None, cache_dir: Path | None = None
) -> list[InstructionExample]:
    """Examples from `source`: "ni" or "natural-instructions" (NI v1), or a data file.

    `max_per_task` and `cache_dir` apply to Natural Instructions only.
    """
    if str(source) in NATURAL_INSTRUCTIONS_NAMES:
        return load_natural_instructions(max_per_task=max_per_task, cache_dir=cache_dir)
    return load_instructions(source)
