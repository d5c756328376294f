"""One entry point for every data source: a local file or Natural Instructions v1."""

from __future__ import annotations

from pathlib import Path

from flexmoe.data.natural_instructions import load_natural_instructions
from flexmoe.data.records import InstructionExample, load_instructions

NATURAL_INSTRUCTIONS = "natural-instructions"


def load_dataset(
    source: str | Path, max_per_task: int | None = None, cache_dir: Path | None = None
) -> list[InstructionExample]:
    """Examples from `source`: "natural-instructions" (NI v1) or a .jsonl/.json/.parquet file.

    `max_per_task` and `cache_dir` apply to Natural Instructions only.
    """
    if str(source) == NATURAL_INSTRUCTIONS:
        return load_natural_instructions(max_per_task=max_per_task, cache_dir=cache_dir)
    return load_instructions(source)
