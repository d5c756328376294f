"""Run settings: described and checked where they are parsed, one error line before Ray starts."""

import re
import subprocess
import sys

import pytest

from flexmoe import data, runconfig
from flexmoe.cli import main
from flexmoe.data import SCHEMES
from flexmoe.errors import FlexMoEError
from flexmoe.runconfig import SPLITS, RunConfig, settings_table
from tests import ROOT


@pytest.fixture
def no_simulation(monkeypatch):
    """Any run that got as far as starting Ray fails the test."""
    from flexmoe.federated import simulation

    monkeypatch.setattr(simulation, "run_simulation", lambda **_: pytest.fail("Ray started"))


def assert_one_error_line(capsys, argv: list[str], phrase: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexmoe: error:") and err.count("\n") == 1, err
    assert phrase in err


@pytest.mark.parametrize(
    ("option", "value", "phrase"),
    [
        ("--size-ratio", "1.5", "size-ratio must be in (0, 1]"),
        ("--experts-per-layer", "0", "experts-per-layer must be at least 1"),
        ("--lr", "nan", "lr must be a finite number"),
        ("--lr", "inf", "lr must be a finite number"),
        ("--gate-bias", "nan", "gate-bias must be a finite number"),
        ("--rounds", "2.9", "rounds must be a whole number"),
        ("--clients", "0", "clients must be at least 1"),
        ("--fraction-train", "0", "fraction-train must be in (0, 1]"),
        ("--split", "random", "split must be one of: pathological, dirichlet, iid"),
        ("--min-lr", "0.5", "min-lr (0.5) must not exceed lr"),
    ],
)
def test_bad_command_line_settings_are_one_line(capsys, no_simulation, option, value, phrase):
    assert_one_error_line(capsys, ["run", option, value], phrase)


@pytest.mark.parametrize(
    ("toml", "phrase"),
    [
        ("rounds = 2.9", "rounds must be a whole number, got 2.9"),
        ("clients = true", "clients must be a whole number, got True"),
        ("lr = inf", "lr must be a finite number"),
        ("method = 3", "method must be text"),
        ("colour = 'red'", "unknown setting 'colour'"),
    ],
)
def test_bad_toml_settings_are_one_line(capsys, tmp_path, no_simulation, toml, phrase):
    config = tmp_path / "run.toml"
    config.write_text(toml + "\n")
    assert_one_error_line(capsys, ["run", "--config", str(config)], phrase)


def test_more_grafted_experts_than_the_model_has_is_refused_before_ray_starts(
    capsys, tmp_path, random_model, dolly_file, no_simulation
):
    argv = ["run", "--model", str(random_model), "--data", str(dolly_file), "--max-length", "512"]
    assert_one_error_line(
        capsys,
        [*argv, "--experts-per-layer", "7", "--out", str(tmp_path)],
        "experts-per-layer 7 is more than the 6 experts per layer",
    )


def test_settings_keep_their_types_and_parse_command_line_text():
    config = RunConfig().updated({"rounds": "3", "alpha": 2, "lr": "2e-3", "model": "x"})
    assert (config.rounds, config.alpha, config.lr) == (3, 2.0, 2e-3)
    assert isinstance(config.alpha, float)
    with pytest.raises(FlexMoEError, match="alpha must be above 0"):
        RunConfig(alpha=0.0)


def test_split_and_selection_token_names_are_the_data_layers():
    assert SPLITS == SCHEMES
    assert runconfig.SELECTION_TOKENS == data.SELECTION_TOKENS


def test_readme_table_of_settings_is_made_from_their_descriptions():
    assert settings_table() in (ROOT / "docs" / "running.md").read_text()


def test_every_setting_has_a_description_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for name in RunConfig().to_flat():
        assert f"--{name} " in help_text


@pytest.mark.parametrize(
    "call", ["build_parser()", "main(['run', '--lr', 'nan'])"], ids=["parser", "bad setting"]
)
def test_the_command_line_imports_no_torch_until_a_command_needs_it(call):
    heavy = ("torch", "transformers", "peft", "flwr", "matplotlib")
    code = (
        f"import sys, flexmoe.cli; flexmoe.cli.{call}; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.stdout.strip() == "[]", loaded.stderr


def test_a_run_saved_before_newer_settings_resumes_with_their_defaults(tmp_path):
    import json

    from flexmoe.runconfig import ADDED_LATER

    old = {k: v for k, v in RunConfig(rounds=3).to_flat().items() if k not in ADDED_LATER}
    (tmp_path / "checkpoint.json").write_text(json.dumps({"run_id": "r", "config": old}))
    assert RunConfig.saved_in(tmp_path) == RunConfig(rounds=3)
    del old["lr"]  # a setting every checkpoint has: its absence is damage
    (tmp_path / "checkpoint.json").write_text(json.dumps({"run_id": "r", "config": old}))
    with pytest.raises(FlexMoEError, match="saved settings are damaged \\(no lr\\)"):
        RunConfig.saved_in(tmp_path)
    # a run made before fixed test pools split its data another way: refused, not misread
    for name in ("lr", "categories", "test-per-category"):
        old.pop(name, None)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"run_id": "r", "config": old}))
    with pytest.raises(FlexMoEError, match=r"before fixed test pools.*start a new run"):
        RunConfig.saved_in(tmp_path)
