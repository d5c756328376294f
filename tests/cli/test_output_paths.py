"""Where a command cannot write, it says so in one line before it works; it leaves nothing
behind when it fails early, and keeps what clients write to their owner."""

import pytest

from benchmarks import bench, report
from flexmoe.cli import main
from flexmoe.cli.run import default_out
from flexmoe.settings import Settings


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("flexmoe: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--rounds", "1"],
        ["deploy-local", "--supernodes", "2"],
        ["graft", "--model", "tiny", "--data", "dolly"],
        ["carve", "--model", "tiny"],
    ],
    ids=lambda c: c[0],
)
def test_a_folder_output_that_is_a_file_or_lies_inside_one_is_refused_before_any_work(
    capsys, a_file, command
):
    for out, phrase in ((a_file, "is not a folder"), (a_file / "out", "is a file, not a folder")):
        assert main([*command, "--out", str(out)]) == 2
        assert phrase in one_error_line(capsys)


def test_the_bench_output_folder_that_is_a_file_or_lies_inside_one_is_refused(capsys, a_file):
    for out, phrase in ((a_file, "is not a folder"), (a_file / "out", "is a file, not a folder")):
        assert bench.main(["--matrix", "default", "--out", str(out)]) == 2
        assert phrase in one_error_line(capsys)


@pytest.mark.parametrize(
    "command",
    [
        ["plan", "--model", "tiny"],
        ["eval", "perplexity", "--model", "tiny"],
        ["eval", "mmlu", "--model", "tiny"],
        ["eval", "cost", "--model", "tiny"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_report_file_that_cannot_be_written_is_refused_before_any_work(
    capsys, tmp_path, a_file, command
):
    for out, phrase in ((tmp_path, "is not a file"), (a_file / "x.json", "is a file, not a")):
        assert main([*command, "--out", str(out)]) == 2
        assert phrase in one_error_line(capsys)


def test_the_report_folder_is_checked_and_an_os_error_is_one_line(capsys, tmp_path, a_file):
    assert report.main([str(a_file)]) == 2
    assert "is not a folder" in one_error_line(capsys)
    too_long = tmp_path / ("x" * 300 + ".json")  # the system itself refuses the name
    assert main(["plan", "--model", "tiny", "--out", str(too_long)]) == 2
    assert "File name too long" in one_error_line(capsys)


def test_graft_refuses_a_folder_holding_files_unless_forced(capsys, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["graft", "--model", "tiny", "--data", "dolly", "--selection-examples", "8"]
    argv += ["--out", str(out)]
    assert main(argv) == 2
    assert "already exists" in one_error_line(capsys)
    assert main([*argv, "--force"]) == 0
    assert (out / "graft_report.json").is_file() and (out / "notes.txt").is_file()


def test_a_run_that_fails_on_its_data_leaves_no_folder_behind(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "data file not found" in one_error_line(capsys)
    assert not out.exists()


def test_default_run_folders_of_the_same_second_differ():
    names = {default_out(Settings()) for _ in range(20)}
    assert len(names) == 20


def test_deploy_local_refuses_what_its_nodes_would_before_starting_anything(capsys, tmp_path):
    out = tmp_path / "deploy"
    assert main(["deploy-local", "--supernodes", "2", "--max-test", "4", "--out", str(out)]) == 2
    assert "takes max-test of at least 8" in one_error_line(capsys)
    argv = ["deploy-local", "--supernodes", "3", "--clients", "2", "--out", str(out)]
    assert main(argv) == 2
    assert "--clients 2 and --supernodes 3 disagree" in one_error_line(capsys)
    assert not out.exists()


def test_deploy_local_refuses_a_folder_holding_a_run_with_advice_that_works(capsys, tmp_path):
    (tmp_path / "checkpoint.json").write_text("{}")
    assert main(["deploy-local", "--supernodes", "2", "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert "cannot resume" in line and "give another --out" in line and "--resume" not in line
