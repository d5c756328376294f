"""Natural Instructions v1 (Mishra et al., ACL 2022), read from the sdist of BIG-bench 1.0.0.

The 61 NI v1 tasks ship inside the `bigbench-1.0.0.tar.gz` sdist as
`bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions/subtaskNNN_<source>_<task>/task.json`
(fields `task_prefix`, `keywords`, `examples` of `{"input", "target": [...]}`). PyPI no longer
serves that sdist, so flexmoe never downloads it: a user who has a copy puts it in the cache
directory (`~/.cache/flexmoe/bigbench/`, or under `$FLEXMOE_CACHE`) or gives its path as the data.
On first use the tasks are stored in the cache as a compact JSONL file, one line per task, so
later runs skip the tarball. BIG-bench asks that its data never enter pretraining corpora: use it
only as the instruction-tuning set it was built to be, and never commit it.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmoe.cache import cache_dir as flexmoe_cache_dir
from flexmoe.data.records import InstructionExample
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_text

BIGBENCH = "bigbench 1.0.0"
SDIST_FILENAME = "bigbench-1.0.0.tar.gz"
TASK_CACHE_FILENAME = "natural_instructions_v1.jsonl"
TASK_MEMBER = re.compile(
    r"^bigbench-1\.0\.0/bigbench/benchmark_tasks/natural_instructions/(subtask\d{3}_\w+)/task\.json$"
)

QUESTION_GENERATION = "question_generation"
ANSWER_GENERATION = "answer_generation"
CLASSIFICATION = "classification"
INCORRECT_ANSWER_GENERATION = "incorrect_answer_generation"
MINIMAL_TEXT_MODIFICATION = "minimal_text_modification"
VERIFICATION = "verification"
NI_CATEGORIES = (
    QUESTION_GENERATION,
    ANSWER_GENERATION,
    CLASSIFICATION,
    INCORRECT_ANSWER_GENERATION,
    MINIMAL_TEXT_MODIFICATION,
    VERIFICATION,
)

# The NI v1 category of every task. Derived from the task names and `keywords`:
# - question_generation: "question_generation" in the name (13 tasks);
# - answer_generation: "answer_generation", "answering", "correct_answer", "question_answering"
#   (16 tasks);
# - incorrect_answer_generation: "wrong_answer", "incorrect_answer", "incorrect_option",
#   "write_incorrect_answer" (8 tasks);
# - classification: a label is chosen from a fixed set: yes/no checks ("presence", "category",
#   "span_based", "grammatical_logical", "binary", "answerability", "identify_bad", "classify_*"),
#   answer/question typing, and picking the sentences needed for an answer (12 tasks);
# - minimal_text_modification: the input text is rewritten a little: winogrande twin sentences
#   ("full_*", "question_modification"), QASC fact editing and combining, paraphrasing, correcting
#   a bad question, ROPES story rewriting (10 tasks);
# - verification: checking words against the input (overlapping words, essential terms) (2 tasks).
# The counts 13/16/12/8/10/2 are those of the NI v1 paper (Table 2, 61 tasks).
NI_TASK_CATEGORIES: dict[str, str] = {
    "subtask001_quoref_question_generation": QUESTION_GENERATION,
    "subtask002_quoref_answer_generation": ANSWER_GENERATION,
    "subtask003_mctaco_question_generation_event_duration": QUESTION_GENERATION,
    "subtask004_mctaco_answer_generation_event_duration": ANSWER_GENERATION,
    "subtask005_mctaco_wrong_answer_generation_event_duration": INCORRECT_ANSWER_GENERATION,
    "subtask006_mctaco_question_generation_transient_stationary": QUESTION_GENERATION,
    "subtask007_mctaco_answer_generation_transient_stationary": ANSWER_GENERATION,
    "subtask008_mctaco_wrong_answer_generation_transient_stationary": INCORRECT_ANSWER_GENERATION,
    "subtask009_mctaco_question_generation_event_ordering": QUESTION_GENERATION,
    "subtask010_mctaco_answer_generation_event_ordering": ANSWER_GENERATION,
    "subtask011_mctaco_wrong_answer_generation_event_ordering": INCORRECT_ANSWER_GENERATION,
    "subtask012_mctaco_question_generation_absolute_timepoint": QUESTION_GENERATION,
    "subtask013_mctaco_answer_generation_absolute_timepoint": ANSWER_GENERATION,
    "subtask014_mctaco_wrong_answer_generation_absolute_timepoint": INCORRECT_ANSWER_GENERATION,
    "subtask015_mctaco_question_generation_frequency": QUESTION_GENERATION,
    "subtask016_mctaco_answer_generation_frequency": ANSWER_GENERATION,
    "subtask017_mctaco_wrong_answer_generation_frequency": INCORRECT_ANSWER_GENERATION,
    "subtask018_mctaco_temporal_reasoning_presence": CLASSIFICATION,
    "subtask019_mctaco_temporal_reasoning_category": CLASSIFICATION,
    "subtask020_mctaco_span_based_question": CLASSIFICATION,
    "subtask021_mctaco_grammatical_logical": CLASSIFICATION,
    "subtask022_cosmosqa_passage_inappropriate_binary": CLASSIFICATION,
    "subtask023_cosmosqa_question_generation": QUESTION_GENERATION,
    "subtask024_cosmosqa_answer_generation": ANSWER_GENERATION,
    "subtask025_cosmosqa_incorrect_answer_generation": INCORRECT_ANSWER_GENERATION,
    "subtask026_drop_question_generation": QUESTION_GENERATION,
    "subtask027_drop_answer_type_generation": CLASSIFICATION,
    "subtask028_drop_answer_generation": ANSWER_GENERATION,
    "subtask029_winogrande_full_object": MINIMAL_TEXT_MODIFICATION,
    "subtask030_winogrande_full_person": MINIMAL_TEXT_MODIFICATION,
    "subtask031_winogrande_question_generation_object": QUESTION_GENERATION,
    "subtask032_winogrande_question_generation_person": QUESTION_GENERATION,
    "subtask033_winogrande_answer_generation": ANSWER_GENERATION,
    "subtask034_winogrande_question_modification_object": MINIMAL_TEXT_MODIFICATION,
    "subtask035_winogrande_question_modification_person": MINIMAL_TEXT_MODIFICATION,
    "subtask036_qasc_topic_word_to_generate_related_fact": MINIMAL_TEXT_MODIFICATION,
    "subtask037_qasc_generate_related_fact": MINIMAL_TEXT_MODIFICATION,
    "subtask038_qasc_combined_fact": MINIMAL_TEXT_MODIFICATION,
    "subtask039_qasc_find_overlapping_words": VERIFICATION,
    "subtask040_qasc_question_generation": QUESTION_GENERATION,
    "subtask041_qasc_answer_generation": ANSWER_GENERATION,
    "subtask042_qasc_incorrect_option_generation": INCORRECT_ANSWER_GENERATION,
    "subtask043_essential_terms_answering_incomplete_questions": ANSWER_GENERATION,
    "subtask044_essential_terms_identifying_essential_words": VERIFICATION,
    "subtask045_miscellaneous_sentence_paraphrasing": MINIMAL_TEXT_MODIFICATION,
    "subtask046_miscellaenous_question_typing": CLASSIFICATION,
    "subtask047_misc_answering_science_questions": ANSWER_GENERATION,
    "subtask048_multirc_question_generation": QUESTION_GENERATION,
    "subtask049_multirc_questions_needed_to_answer": CLASSIFICATION,
    "subtask050_multirc_answerability": CLASSIFICATION,
    "subtask051_multirc_correct_answer_single_sentence": ANSWER_GENERATION,
    "subtask052_multirc_identify_bad_question": CLASSIFICATION,
    "subtask053_multirc_correct_bad_question": MINIMAL_TEXT_MODIFICATION,
    "subtask054_multirc_write_correct_answer": ANSWER_GENERATION,
    "subtask055_multirc_write_incorrect_answer": INCORRECT_ANSWER_GENERATION,
    "subtask056_multirc_classify_correct_answer": CLASSIFICATION,
    "subtask057_multirc_classify_incorrect_answer": CLASSIFICATION,
    "subtask058_multirc_question_answering": ANSWER_GENERATION,
    "subtask059_ropes_story_generation": MINIMAL_TEXT_MODIFICATION,
    "subtask060_ropes_question_generation": QUESTION_GENERATION,
    "subtask061_ropes_answer_generation": ANSWER_GENERATION,
}


@dataclass(frozen=True)
class NaturalInstructionsTask:
    """One NI v1 task: its instruction (the `task_prefix`) and (input, output) pairs."""

    name: str
    category: str
    instruction: str
    examples: list[tuple[str, str]]

    def to_examples(self, limit: int | None = None) -> list[InstructionExample]:
        """The first `limit` (default: all) pairs as InstructionExamples."""
        return [
            InstructionExample(self.instruction, input_, output, self.category)
            for input_, output in self.examples[:limit]
        ]


def load_natural_instructions(
    categories: Iterable[str] | None = None,
    tasks: Iterable[str] | None = None,
    max_per_task: int | None = None,
    cache_dir: Path | None = None,
    sdist: Path | None = None,
) -> list[InstructionExample]:
    """NI v1 examples, optionally only some categories / tasks and the first N of each task.

    The tasks come from the ``sdist`` given, else from the cache (``natural_instructions_tasks``).
    """
    selected = select_tasks(categories, tasks)
    every_task = read_tasks_from_tarball(sdist) if sdist else natural_instructions_tasks(cache_dir)
    if max_per_task is not None and max_per_task < 1:
        raise FlexMoEError(f"max examples per task must be at least 1, got {max_per_task}")
    return [
        example
        for task in every_task
        if task.name in selected
        for example in task.to_examples(max_per_task)
    ]


def select_tasks(categories: Iterable[str] | None, tasks: Iterable[str] | None) -> set[str]:
    """Names of the tasks in the given categories and/or named tasks (all tasks if neither)."""
    categories = None if categories is None else set(categories)
    tasks = None if tasks is None else set(tasks)
    _check_known("category", categories, NI_CATEGORIES)
    _check_known("task", tasks, NI_TASK_CATEGORIES)
    selected = {
        name
        for name, category in NI_TASK_CATEGORIES.items()
        if (categories is None or category in categories) and (tasks is None or name in tasks)
    }
    if not selected:
        raise FlexMoEError(
            "the chosen Natural Instructions categories and tasks have no task in common; "
            "widen the selection"
        )
    return selected


def natural_instructions_tasks(cache_dir: Path | None = None) -> list[NaturalInstructionsTask]:
    """All NI v1 tasks, from the JSONL cache, building it from the cached sdist if needed."""
    cache_dir = cache_dir or flexmoe_cache_dir()
    cache_file = cache_dir / TASK_CACHE_FILENAME
    if cache_file.is_file():
        return _read_task_cache(cache_file)
    tasks = read_tasks_from_tarball(bigbench_sdist(cache_dir))
    _write_task_cache(tasks, cache_file)
    return tasks


def bigbench_sdist(cache_dir: Path | None = None) -> Path:
    """Path of the bigbench 1.0.0 sdist in the cache; one line saying where to put it if absent."""
    path = (cache_dir or flexmoe_cache_dir()) / "bigbench" / SDIST_FILENAME
    if not path.is_file():
        raise FlexMoEError(
            f"Natural Instructions v1 needs the {BIGBENCH} sdist, which PyPI no longer serves: "
            f"put your copy of {SDIST_FILENAME} at {path}, or give its path with --data; "
            "or use the packaged Dolly-15k (--data dolly)"
        )
    return path


def read_tasks_from_tarball(tarball: Path) -> list[NaturalInstructionsTask]:
    """Parse every NI v1 `task.json` in the bigbench sdist, sorted by task name."""
    tasks = []
    try:
        with tarfile.open(tarball, "r:*") as archive:
            for member in archive:
                match = TASK_MEMBER.match(member.name)
                if match and member.isfile():
                    data = _load_json_member(archive, member)
                    tasks.append(_parse_task(match.group(1), data, f"{tarball}:{member.name}"))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise FlexMoEError(
            f"cannot read {tarball} ({error}); it is damaged or incomplete; replace it with "
            "a good copy"
        ) from None
    if not tasks:
        raise FlexMoEError(
            f"no Natural Instructions tasks in {tarball}; it must be the {BIGBENCH} "
            "sdist, replace it with a good copy"
        )
    return sorted(tasks, key=lambda task: task.name)


def _load_json_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> Any:
    stream = archive.extractfile(member)
    if stream is None:
        raise FlexMoEError(f"{member.name} in the bigbench sdist is not a regular file")
    try:
        return json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FlexMoEError(
            f"{member.name} in the bigbench sdist is not valid JSON ({error}); replace the sdist"
        ) from None


def _parse_task(name: str, data: Any, where: str) -> NaturalInstructionsTask:
    if name not in NI_TASK_CATEGORIES:
        raise FlexMoEError(
            f"{where}: task {name!r} has no NI v1 category; only the 61 tasks of "
            f"{BIGBENCH} are known, use that sdist"
        )
    if not isinstance(data, dict) or not isinstance(data.get("task_prefix"), str):
        raise FlexMoEError(f"{where}: expected an object with a string 'task_prefix'")
    if not isinstance(data.get("examples"), list):
        raise FlexMoEError(f"{where}: expected a list of 'examples'")
    pairs = [
        _parse_pair(example, f"{where}, example {i}") for i, example in enumerate(data["examples"])
    ]
    return NaturalInstructionsTask(
        name, NI_TASK_CATEGORIES[name], data["task_prefix"].strip(), pairs
    )


def _parse_pair(example: Any, where: str) -> tuple[str, str]:
    """(input, first target) of one example."""
    target = example.get("target") if isinstance(example, dict) else None
    if isinstance(target, list) and target:
        target = target[0]
    if not isinstance(target, str) or not isinstance(example.get("input"), str):
        raise FlexMoEError(f"{where}: expected a string 'input' and a non-empty 'target' list")
    return example["input"], target


def _write_task_cache(tasks: Sequence[NaturalInstructionsTask], path: Path) -> None:
    """Write one JSON line per task, atomically (a crash never leaves a half-written cache)."""
    records = (
        {
            "task": task.name,
            "category": task.category,
            "instruction": task.instruction,
            "examples": task.examples,
        }
        for task in tasks
    )
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _read_task_cache(path: Path) -> list[NaturalInstructionsTask]:
    tasks = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                pairs = [(input_, output) for input_, output in record["examples"]]
                tasks.append(
                    NaturalInstructionsTask(
                        record["task"], record["category"], record["instruction"], pairs
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise FlexMoEError(
                    f"{path}, line {line_number}: damaged cache ({error!r}); delete the file to "
                    "rebuild it"
                ) from None
    return tasks


def _check_known(kind: str, names: set[str] | None, known: Iterable[str]) -> None:
    unknown = sorted((names or set()) - set(known))
    if unknown:
        raise FlexMoEError(
            f"unknown Natural Instructions {kind}: {', '.join(unknown)}; "
            f"choose from: {', '.join(sorted(known))}"
        )
