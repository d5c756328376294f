"""Reading instruction records (JSONL, JSON, Parquet, compressed; the packaged Dolly-15k)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flexmoe.data import (
    NATURAL_INSTRUCTIONS,
    NATURAL_INSTRUCTIONS_NAMES,
    PAPER_CATEGORIES,
    InstructionExample,
    canonical_order,
    category_counts,
    load_dataset,
    load_instructions,
    partition_examples,
)
from flexmoe.data.dolly import DOLLY_SIZE
from flexmoe.data.records import COMPRESSIONS
from flexmoe.errors import FlexMoEError

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "output": "Blue"},
    {"instruction": "Say hi.", "input": None, "output": "Hi"},
]
DOLLY = [
    {
        "instruction": "Who wrote Hamlet?",
        "context": "",
        "response": "Shakespeare.",
        "category": "open_qa",
    },
    {
        "instruction": "Summarize.",
        "context": "A long text.",
        "response": "Short.",
        "category": "summarization",
    },
]
ALPACA_EXPECTED = [
    InstructionExample("Add the numbers.", "2 and 3", "5"),
    InstructionExample("Name a colour.", "", "Blue"),
    InstructionExample("Say hi.", "", "Hi"),
]
DOLLY_EXPECTED = [
    InstructionExample("Who wrote Hamlet?", "", "Shakespeare.", "open_qa"),
    InstructionExample("Summarize.", "A long text.", "Short.", "summarization"),
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}


@pytest.mark.parametrize("suffix", sorted(WRITERS))
@pytest.mark.parametrize(
    ("records", "expected"), [(ALPACA, ALPACA_EXPECTED), (DOLLY, DOLLY_EXPECTED)]
)
def test_reads_alpaca_and_dolly_shapes_from_every_format(tmp_path, suffix, records, expected):
    path = WRITERS[suffix](tmp_path / f"data.{suffix}", records)
    assert load_instructions(path) == expected


def test_jsonl_skips_blank_lines_and_accepts_string_paths(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n" + json.dumps(ALPACA[0]) + "\n\n" + json.dumps(ALPACA[1]) + "\n")
    assert load_instructions(str(path)) == ALPACA_EXPECTED[:2]


def test_suffix_is_case_insensitive(tmp_path):
    path = write_json(tmp_path / "DATA.JSON", DOLLY)
    assert load_instructions(path) == DOLLY_EXPECTED


def test_category_counts_largest_first():
    examples = [InstructionExample("i", "", "o", c) for c in ["a", "b", "b", None, "b"]]
    assert list(category_counts(examples).items()) == [("b", 3), ("a", 1), (None, 1)]


def test_load_dataset_reads_files_in_canonical_order_and_names_natural_instructions(tmp_path):
    loaded = load_dataset(write_jsonl(tmp_path / "d.jsonl", DOLLY))
    assert loaded == canonical_order(DOLLY_EXPECTED)
    assert load_dataset(write_jsonl(tmp_path / "r.jsonl", DOLLY[::-1])) == loaded
    assert NATURAL_INSTRUCTIONS == "natural-instructions"
    assert NATURAL_INSTRUCTIONS_NAMES == ("ni", "natural-instructions")


def test_canonical_order_is_a_hash_of_all_four_fields_whatever_the_input_order():
    examples = [
        InstructionExample(f"task {i % 3}", f"in {i % 2}", f"out {i}", f"c{i % 4}")
        for i in range(40)
    ]
    ordered = canonical_order(examples)
    assert sorted(ordered, key=str) == sorted(examples, key=str)
    assert canonical_order(reversed(examples)) == ordered
    assert ordered != examples  # a hash order, not the order given


@pytest.mark.parametrize("compression", ["xz", "gz", "bz2"])
@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_text_files_may_be_compressed(tmp_path, suffix, compression):
    plain = WRITERS[suffix](tmp_path / f"data.{suffix}", DOLLY)
    packed = tmp_path / f"data.{suffix}.{compression}"
    with COMPRESSIONS[f".{compression}"](packed, "wb") as stream:
        stream.write(plain.read_bytes())
    assert load_instructions(packed) == DOLLY_EXPECTED


def test_a_damaged_compressed_file_is_named(tmp_path):
    packed = tmp_path / "data.jsonl.xz"
    packed.write_bytes(b"not xz at all")
    assert "damaged or not .xz compressed" in error_message(packed)
    assert "use one of" in error_message(write_jsonl(tmp_path / "d.parquet.gz", DOLLY))


def test_the_packaged_dolly_is_all_of_dolly_15k():
    examples = load_dataset("dolly")
    assert len(examples) == DOLLY_SIZE == 15_011
    assert len(set(examples)) == 15_003  # 8 exact duplicates, as upstream
    assert category_counts(examples) == {
        "open_qa": 3742, "general_qa": 2191, "classification": 2136, "closed_qa": 1773,
        "brainstorming": 1766, "information_extraction": 1506, "summarization": 1188,
        "creative_writing": 709,
    }  # fmt: skip
    assert set(PAPER_CATEGORIES) < set(category_counts(examples))
    license_notice = (resources.files("flexmoe") / "assets" / "dolly" / "README.md").read_text()
    assert "CC BY-SA 3.0" in license_notice and "Databricks" in license_notice


def error_message(path: Path) -> str:
    with pytest.raises(FlexMoEError) as raised:
        load_instructions(path)
    return str(raised.value)


def test_missing_file(tmp_path):
    assert "not found" in error_message(tmp_path / "nope.jsonl")


def test_directory_is_not_a_data_file(tmp_path):
    assert "not found" in error_message(tmp_path)


def test_unsupported_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\na,b\n")
    message = error_message(path)
    assert "'.csv'" in message and ".jsonl" in message and ".parquet" in message


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", ""), ("list.json", "[]")],
)
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert "contains no records" in error_message(path)


def test_empty_parquet(tmp_path):
    schema = pa.schema([("instruction", pa.string()), ("output", pa.string())])
    path = tmp_path / "empty.parquet"
    pq.write_table(schema.empty_table(), path)
    assert "contains no records" in error_message(path)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "x", \n')
    message = error_message(path)
    assert "line 3" in message and "malformed JSON" in message


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "x", "output": "y"},\n{oops}\n]')
    assert "line 3" in error_message(path)


def test_json_that_is_not_a_list(tmp_path):
    assert "not a list" in error_message(write_json(tmp_path / "d.json", ALPACA[0]))


def test_file_that_is_not_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in error_message(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    assert "UTF-8" in error_message(path)


@pytest.mark.parametrize(
    ("record", "missing"),
    [
        ({"input": "x", "output": "y"}, "'instruction'"),
        ({"instruction": "x", "input": "y"}, "'output' or 'response'"),
    ],
)
def test_record_missing_fields_names_index_and_accepted_fields(tmp_path, record, missing):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], record])
    message = error_message(path)
    assert "record 1 of" in message and missing in message
    assert "Alpaca: instruction, input (optional), output" in message
    assert "Dolly: instruction, context (optional), response" in message


def test_record_that_is_not_an_object(tmp_path):
    message = error_message(write_json(tmp_path / "d.json", [ALPACA[0], ["a", "b"]]))
    assert "record 1 of" in message and "must be an object, not list" in message


def test_field_of_the_wrong_type(tmp_path):
    record = {"instruction": "x", "output": 5}
    message = error_message(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert "record 0 of" in message and "'output' must be a string, not int" in message


@pytest.mark.parametrize(
    ("record", "phrase"),
    [
        ({"instruction": "Add.", "output": None}, "field 'output' is null"),
        ({"instruction": "Add.", "output": "  "}, "field 'output' is empty"),
        ({"instruction": "", "output": "2"}, "field 'instruction' is empty"),
    ],
)
def test_null_and_empty_required_fields_are_named(tmp_path, record, phrase):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(FlexMoEError, match=phrase):
        load_instructions(path)


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "Hi", "output": "Yo"}]).encode())
    assert load_instructions(path)[0].output == "Yo"


def test_iid_split_needs_no_category():
    examples = [InstructionExample(f"q{i}", "", f"a{i}") for i in range(10)]
    partition = partition_examples(examples, 3, "iid", seed=0)
    indices = sorted(i for client in partition.client_indices for i in client)
    assert indices == list(range(10)) and [len(c) for c in partition.client_indices] == [4, 3, 3]
    assert partition.categories == ["uncategorised"]
    with pytest.raises(FlexMoEError, match="use split iid"):
        partition_examples(examples, 3, "pathological", seed=0)
