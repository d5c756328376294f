"""databricks-dolly-15k, the FLEx paper's data, shipped in the package (CC BY-SA 3.0).

The records are ``assets/dolly/databricks-dolly-15k.jsonl.xz``; its license and attribution are
in the README beside it. The paper's pathological split gives each of 4 clients one of
``PAPER_CATEGORIES``, and scores every method on 100 test examples of each.
"""

from __future__ import annotations

from importlib import resources

from flexmoe.data.records import InstructionExample, load_instructions
from flexmoe.errors import FlexMoEError

DOLLY = "dolly"
DOLLY_FILE = "databricks-dolly-15k.jsonl.xz"
DOLLY_SIZE = 15_011
PAPER_CATEGORIES = ("classification", "closed_qa", "information_extraction", "summarization")


def load_dolly() -> list[InstructionExample]:
    """The 15,011 Dolly-15k records shipped with flexmoe, in the file's order."""
    packaged = resources.files("flexmoe").joinpath("assets", DOLLY, DOLLY_FILE)
    with resources.as_file(packaged) as path:
        if not path.is_file():
            raise FlexMoEError(f"{path} is missing; reinstall flexmoe")
        examples = load_instructions(path)
    if len(examples) != DOLLY_SIZE:
        raise FlexMoEError(
            f"{path} holds {len(examples)} records, not {DOLLY_SIZE}; reinstall flexmoe"
        )
    return examples
