"""The command line: graft and info on real folders, and short errors for bad input."""

import json
import subprocess
import sys

import pytest

from flexmoe.cli import main
from flexmoe.flex.model import CONFIG_NAME, PERSONAL_WEIGHTS


def graft(model_dir, data, out, *extra) -> dict:
    argv = ["graft", "--model", str(model_dir), "--data", str(data), "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "graft_report.json").read_text())


def test_graft_chooses_the_lowest_losses_on_every_architecture(model_dir, alpaca_file, tmp_path):
    report = graft(model_dir, alpaca_file, tmp_path / "adapter")
    assert report["layers"]
    for layer in report["layers"]:
        losses = layer["losses"]
        assert len(losses) >= 6 and all(loss > 0 for loss in losses)
        assert layer["chosen"] == [min(range(len(losses)), key=losses.__getitem__)]
    assert (tmp_path / "adapter" / PERSONAL_WEIGHTS).is_file()
    assert (tmp_path / "adapter" / CONFIG_NAME).is_file()


def test_graft_several_lightweight_experts(model_dir, alpaca_file, tmp_path):
    report = graft(
        model_dir, alpaca_file, tmp_path / "a", "--experts-per-layer", "2", "--size-ratio", "0.5"
    )
    for layer in report["layers"]:
        ranked = sorted(range(len(layer["losses"])), key=layer["losses"].__getitem__)
        assert layer["chosen"] == ranked[:2]
    saved = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert all(g["intermediate_sizes"] == [8, 8] for g in saved["grafts"])
    assert report["examples"] == 7 and report["size_ratio"] == 0.5


def test_info_describes_the_moe_layout(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert str(model_dir) in out and "top-k              2" in out
    assert "MoE layers" in out and "experts per layer" in out


def assert_short_error(capsys, argv: list[str], *phrases: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexmoe: error:") and err.count("\n") == 1
    for phrase in phrases:
        assert phrase in err


def test_bad_models_give_short_errors(tmp_path, dense_model_dir, capsys):
    assert_short_error(capsys, ["info", str(dense_model_dir)], "'llama'", "dense model")
    assert_short_error(capsys, ["info", str(tmp_path / "missing")], "does not exist")
    assert_short_error(capsys, ["info", str(tmp_path)], "no config.json")


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("", "contains no records"),
        ('{"instruction": "x", "output": "y"}\n{"instruction": \n', "line 2"),
        ('{"question": "x", "answer": "y"}\n', "instruction"),
    ],
)
def test_bad_data_gives_short_errors(tmp_path, olmoe_dir, capsys, content, phrase):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    argv = ["graft", "--model", str(olmoe_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    assert_short_error(capsys, argv, phrase)


def test_adapter_for_another_base_is_a_short_error(tmp_path, alpaca_file, olmoe_dir, capsys):
    from tests.tiny_models import save_model

    other = save_model(tmp_path / "other", "olmoe", seed=1)
    graft(olmoe_dir, alpaca_file, tmp_path / "adapter")
    assert main(["info", str(olmoe_dir), "--adapter", str(tmp_path / "adapter")]) == 0
    capsys.readouterr()
    argv = ["info", str(other), "--adapter", str(tmp_path / "adapter")]
    assert_short_error(capsys, argv, "made for base model")


@pytest.mark.slow
def test_console_entry_point_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flexmoe", "info", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("flexmoe: error:") and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["graft", "--model", "tiny"], ["nonsense"]])
def test_usage_errors_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_eval_mmlu_and_perplexity_on_a_personalised_model(tmp_path, olmoe_dir, alpaca_file, capsys):
    rows = [
        {
            "question": f"Question {i}?",
            "answer_a": "one",
            "answer_b": "two",
            "answer_c": "three",
            "answer_d": "four",
            "correct_answer": "ABCD"[i % 4],
            "topic": topic,
        }
        for topic in ("astronomy", "virology")
        for i in range(7)
    ]
    data = tmp_path / "mmlu.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    graft(olmoe_dir, alpaca_file, tmp_path / "adapter")
    argv = [
        "eval",
        "mmlu",
        "--model",
        str(olmoe_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "mmlu.json"),
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "mmlu.json").read_text())
    assert result["total"] == 4 and set(result["topics"]) == {"astronomy", "virology"}
    assert "overall" in capsys.readouterr().out
    argv = ["eval", "perplexity", "--model", "tiny", "--max-tokens", "300"]
    assert main(argv) == 0
    assert "shakespeare" in capsys.readouterr().out


def test_eval_cost_grafts_each_count_and_prices_it_against_the_base(tmp_path, olmoe_dir, capsys):
    out = tmp_path / "cost.json"
    argv = ["eval", "cost", "--model", str(olmoe_dir), "--experts-per-layer", "1,2"]
    small = ["--batches", "1", "--batch-size", "2", "--seq-len", "8", "--repeats", "1"]
    assert main([*argv, *small, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["experts_per_layer"] for row in rows] == [1, 2]
    assert [row["experts_per_token"] for row in rows] == [3, 4]  # top-2 plus the grafts
    assert 1 < rows[0]["flops_ratio"] < rows[1]["flops_ratio"]
    assert all(row["latency"]["tokens"] == 16 and row["latency"]["ratio"] > 0 for row in rows)
    assert "latency ratio" in capsys.readouterr().out
    adapter = ["--adapter", str(tmp_path / "adapter")]
    assert main([*argv, *adapter]) == 2
    assert "give --adapter or --experts-per-layer, not both" in capsys.readouterr().err
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Repeat: apple.", "output": "apple"}) + "\n")
    graft = ["graft", "--model", str(olmoe_dir), "--data", str(data), "--out", adapter[1]]
    assert main(graft) == 0
    cost = ["eval", "cost", "--model", str(olmoe_dir), *adapter, *small, "--out", str(out)]
    assert main(cost) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["adapter"] == adapter[1] and row["experts_per_token"] == 3


def test_graft_works_with_a_tokenizer_that_has_no_special_tokens(tmp_path, alpaca_file, tokenizer):
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import build_model

    folder = tmp_path / "bare"
    build_model("mixtral").save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer).save_pretrained(folder)
    report = graft(folder, alpaca_file, tmp_path / "adapter")
    assert len(report["layers"]) == 2
