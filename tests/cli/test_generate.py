"""`flexmoe generate`: one prompt streamed, a file answered in batches, bad input in one line."""

import json

import pytest

from flexmoe.cli import main
from flexmoe.data import InstructionExample, load_instructions
from flexmoe.evaluation.generation import generate_answers
from flexmoe.models.loading import load_model


def greedy(examples, max_new_tokens=8, max_length=512) -> list[str]:
    model, tokenizer = load_model("tiny")
    return generate_answers(model, tokenizer, examples, max_new_tokens, max_length - max_new_tokens)


def test_a_prompt_is_answered_greedily_on_the_terminal(capsys):
    argv = ["generate", "--model", "tiny", "--prompt", "Name a colour.", "--max-new-tokens", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()
    assert printed and printed == greedy([InstructionExample("Name a colour.", "", "")])[0]


def test_a_file_is_answered_in_batches_as_jsonl(alpaca_file, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", "tiny", "--data", str(alpaca_file), "--out", str(out)]
    assert main([*argv, "--max-new-tokens", "8", "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    examples = load_instructions(alpaca_file)
    assert [r["instruction"] for r in rows] == [e.instruction for e in examples]
    assert [r["reference"] for r in rows] == [e.output for e in examples]
    assert [r["answer"] for r in rows] == greedy(examples)
    assert "7 answers written" in capsys.readouterr().out


def test_prompts_without_answers_and_an_adapter(tmp_path, alpaca_file):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Say hello."}\n{"instruction": "Count.", "input": "1 2"}\n')
    adapter = tmp_path / "adapter"
    graft = ["graft", "--model", "tiny", "--data", str(alpaca_file), "--out", str(adapter)]
    assert main(graft) == 0
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", "tiny", "--adapter", str(adapter), "--data", str(prompts)]
    assert main([*argv, "--out", str(out), "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == ["", "1 2"] and all("reference" not in r for r in rows)


def test_sampling_follows_its_seed(capsys):
    argv = ["generate", "--model", "tiny", "--prompt", "Name a colour.", "--max-new-tokens", "12"]
    sampled = [*argv, "--temperature", "1.5", "--top-p", "0.95"]
    answers = []
    for seed in ("1", "1", "2"):
        assert main([*sampled, "--seed", seed]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] != answers[2]


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (["--data", "dolly"], "--data needs --out"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be 0 (greedy) or more"),
        (["--prompt", "x", "--top-p", "0"], "top-p must be in (0, 1]"),
        (["--prompt", "x", "--max-new-tokens", "600"], "must be less than max-length (512)"),
        (["--data", "missing.jsonl", "--out", "a.jsonl"], "data file not found: missing.jsonl"),
    ],
)
def test_bad_input_is_one_line(extra, error, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "tiny", *extra]) == 2
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and error in printed[0]
