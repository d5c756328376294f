"""Instruction-tuning records and readers for Alpaca- and Dolly-shaped files."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
# text formats may also be compressed: data.jsonl.xz, data.json.gz
COMPRESSIONS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
_INPUT_FIELDS = ("input", "context")
_OUTPUT_FIELDS = ("output", "response")
_ACCEPTED_SHAPES = (
    "Alpaca: instruction, input (optional), output; "
    "Dolly: instruction, context (optional), response, category (optional)"
)


@dataclass(frozen=True, slots=True)
class InstructionExample:
    """One instruction-tuning example: the task, its optional input, the wanted output."""

    instruction: str
    input: str
    output: str
    category: str | None = None

    @property
    def prompt_id(self) -> str:
        """A stable name for the prompt (a hash of instruction and input), the same anywhere."""
        text = json.dumps([self.instruction, self.input], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_instructions(path: str | Path, with_outputs: bool = True) -> list[InstructionExample]:
    """Read Alpaca- or Dolly-shaped records from a .jsonl, .json (a list) or .parquet file;
    without ``with_outputs``, records may lack the answer (prompts to answer).

    A .jsonl or .json file may be compressed (``.xz``, ``.gz``, ``.bz2`` after its suffix).
    """
    path = Path(path)
    if not path.is_file():
        raise FlexMoEError(f"data file not found: {path}; check the path (it must be a file)")
    readers = {".jsonl": _read_jsonl, ".json": _read_json_list, ".parquet": _read_parquet}
    reader = readers.get(_format_suffix(path))
    if reader is None:
        raise FlexMoEError(
            f"unsupported data file type {''.join(path.suffixes) or '(none)'!r} for {path}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)} (.jsonl and .json may end in "
            f"{', '.join(COMPRESSIONS)})"
        )
    records = reader(path)
    if not records:
        raise FlexMoEError(f"{path} contains no records; add at least one example")
    return [
        example_from_record(record, f"record {i} of {path}", with_outputs)
        for i, record in enumerate(records)
    ]


def example_from_record(record: Any, where: str, with_output: bool = True) -> InstructionExample:
    """Convert one Alpaca- or Dolly-shaped mapping into an InstructionExample."""
    if not isinstance(record, Mapping):
        raise FlexMoEError(f"{where} must be an object, not {type(record).__name__}; {_fix()}")
    return InstructionExample(
        instruction=_text_field(record, ("instruction",), where, required=True),
        input=_text_field(record, _INPUT_FIELDS, where, required=False),
        output=_text_field(record, _OUTPUT_FIELDS, where, required=with_output),
        category=_text_field(record, ("category",), where, required=False) or None,
    )


def canonical_order(examples: Iterable[InstructionExample]) -> list[InstructionExample]:
    """``examples`` sorted by a hash of their four fields: the same list whatever order a file
    holds them in, so that seeded splits do not depend on it."""
    return sorted(examples, key=_content_hash)


def _content_hash(example: InstructionExample) -> str:
    fields = [example.instruction, example.input, example.output, example.category]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()


def category_counts(examples: Iterable[InstructionExample]) -> dict[str | None, int]:
    """Number of examples per category, largest first."""
    return dict(Counter(example.category for example in examples).most_common())


def _text_field(
    record: Mapping[str, Any], names: Sequence[str], where: str, *, required: bool
) -> str:
    """The first present, non-null field among `names`, as a string ("" if optional and absent).

    A required field must hold some text: null or blank is refused, naming the field.
    """
    for name in names:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise FlexMoEError(
                f"{where}: field {name!r} must be a string, not {type(value).__name__}; {_fix()}"
            )
        if required and not value.strip():
            raise FlexMoEError(f"{where}: field {name!r} is empty; every example needs its text")
        return value
    if required:
        null = [name for name in names if name in record]
        if null:
            raise FlexMoEError(f"{where}: field {null[0]!r} is null; every example needs its text")
        present = ", ".join(sorted(map(str, record))) or "none"
        raise FlexMoEError(
            f"{where} has no {' or '.join(map(repr, names))} field (fields present: {present}); "
            f"{_fix()}"
        )
    return ""


def _fix() -> str:
    return f"each record needs the fields of one accepted shape ({_ACCEPTED_SHAPES})"


def _format_suffix(path: Path) -> str:
    """The suffix naming the file's format: ``.jsonl`` for ``data.jsonl`` and ``data.jsonl.xz``."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if len(suffixes) > 1 and suffixes[-1] in COMPRESSIONS and suffixes[-2] != ".parquet":
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def _read_text(path: Path) -> str:
    opener = COMPRESSIONS.get(path.suffix.lower())
    try:
        if opener is None:
            return path.read_text(encoding="utf-8-sig")  # a byte-order mark is not content
        with opener(path, "rt", encoding="utf-8-sig") as stream:
            return stream.read()
    except UnicodeDecodeError as error:
        raise FlexMoEError(
            f"{path} is not UTF-8 text ({error.reason}); re-save it as UTF-8"
        ) from None
    except (lzma.LZMAError, gzip.BadGzipFile, OSError, EOFError) as error:
        raise FlexMoEError(
            f"cannot read {path} ({error}); it is damaged or not {path.suffix} compressed"
        ) from None


def _read_jsonl(path: Path) -> list[Any]:
    records = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise FlexMoEError(
                f"{path}, line {line_number}: malformed JSON ({error.msg}); "
                "each line of a .jsonl file must hold one complete JSON object"
            ) from None
    return records


def _read_json_list(path: Path) -> list[Any]:
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise FlexMoEError(
            f"{path}, line {error.lineno}: malformed JSON ({error.msg}); "
            "a .json data file must hold one JSON list of objects"
        ) from None
    if not isinstance(data, list):
        raise FlexMoEError(
            f"{path} holds a JSON {type(data).__name__}, not a list; "
            "a .json data file must hold one JSON list of objects (or use .jsonl)"
        )
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    # Imported here so that only Parquet users pay for loading pyarrow.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise FlexMoEError(
            f"{path} is not a readable Parquet file ({error}); re-export it with pyarrow or pandas"
        ) from None
