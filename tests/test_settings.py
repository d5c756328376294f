"""Run settings: declared once in groups, checked where they are parsed (one error line before
Ray starts), read from flat, dotted and grouped names alike."""

import re
import subprocess
import sys
import tomllib

import pytest

from flexmoe import data
from flexmoe.cli import main
from flexmoe.data import SCHEMES
from flexmoe.errors import FlexMoEError
from flexmoe.flex import config as flex_config
from flexmoe.settings import SPLITS, Settings, flower_app_config, settings_table
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
        ("--micro-batch-size", "8", "micro-batch-size (8) is more than batch-size (4)"),
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
    config = Settings().updated({"rounds": "3", "alpha": 2, "lr": "2e-3", "model": "x"})
    assert (config.federation.rounds, config.data.alpha, config.train.lr) == (3, 2.0, 2e-3)
    assert isinstance(config.data.alpha, float)
    with pytest.raises(FlexMoEError, match="alpha must be above 0"):
        Settings.of(alpha=0.0)


def test_split_and_selection_token_names_are_the_data_layers():
    assert SPLITS == SCHEMES
    assert flex_config.SELECTION_TOKENS == data.SELECTION_TOKENS


def test_the_docs_table_and_the_flower_app_config_are_made_from_the_declarations():
    assert settings_table() in (ROOT / "docs" / "running.md").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = tomllib.loads(flower_app_config())["tool"]["flwr"]["app"]["config"]
    assert tomllib.loads(pyproject)["tool"]["flwr"]["app"]["config"] == declared
    assert "\n".join(flower_app_config().splitlines()[1:]) in pyproject


def test_flat_dotted_and_grouped_names_set_the_same_setting():
    flat = Settings.of(lr=0.01, selection_tokens="answer", data="x.jsonl")
    dotted = Settings().updated(
        {"train.lr": 0.01, "graft.selection-tokens": "answer", "data.source": "x.jsonl"}
    )
    grouped = Settings().updated(
        {"train": {"lr": 0.01}, "graft": {"selection_tokens": "answer"}, "data": "x.jsonl"}
    )
    assert flat == dotted == grouped != Settings()
    assert (flat.train.lr, flat.graft.selection_tokens, flat.data.source) == (
        0.01,
        "answer",
        "x.jsonl",
    )
    assert Settings().updated(flat.to_run_config()) == flat  # Flower's run config comes back
    assert Settings().updated(flat.to_record()) == flat  # and so does a checkpoint's record


def test_a_method_and_its_settings_change_together():
    median = Settings.of(aggregation="median")
    assert median.updated({"method": "fedadam", "aggregation": "mean"}).method == "fedadam"
    private = Settings.of(dp_clipping_norm=1.0)
    assert private.updated({"method": "local", "dp-clipping-norm": 0.0}).method == "local"
    with pytest.raises(FlexMoEError, match="fedadam aggregates with its own server optimiser"):
        median.updated({"method": "fedadam"})


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ({"train.rounds": 4}, "rounds is a setting of [federation], not of [train]"),
        ({"lr": 0.1, "train.lr": 0.2}, "train.lr is given twice"),
        ({"data": {"data": "x", "source": "y"}}, "data.source is given twice"),
        ({"train.colour": 1}, "unknown setting 'train.colour'"),
        ({"colour": 1}, "unknown setting 'colour'; known: aggregation, alpha, batch-size"),
        ({"colours.lr": 1}, "unknown setting group 'colours'"),
        ({"train": {"lr": "fast"}}, "lr must be a number, got 'fast'"),
    ],
)
def test_a_bad_dotted_or_grouped_name_is_one_error(values, phrase):
    with pytest.raises(FlexMoEError, match=re.escape(phrase)):
        Settings().updated(values)


def test_a_toml_file_may_group_its_settings(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "fedavg"\n[train]\nlr = 0.01\n[federation]\nrounds = 3\n')
    assert Settings.from_toml(config) == Settings.of(method="fedavg", lr=0.01, rounds=3)


def test_graft_plan_and_eval_take_their_options_from_the_same_declarations(capsys):
    for argv in (["graft", "--help"], ["plan", "--help"], ["eval", "cost", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for spec in flex_config.GraftSettings.specs():
        assert spec.metadata["help"] in help_text
    assert "--selection-tokens" in help_text


def test_every_setting_has_a_description_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for name in Settings().to_flat():
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

    from flexmoe.federated.run import saved_settings

    newer = ("selection-examples", "eval-batch-size", "dtype")
    old = {k: v for k, v in Settings.of(rounds=3).to_flat().items() if k not in newer}
    # grafting scored every training example before selection-examples bounded it
    assert saved_settings(tmp_path, old) == Settings.of(rounds=3, selection_examples=0)
    del old["lr"]  # a setting every checkpoint has: its absence is damage
    with pytest.raises(FlexMoEError, match="saved settings are damaged \\(no lr\\)"):
        saved_settings(tmp_path, old)
    # a run made before fixed test pools split its data another way: refused, not misread
    for name in ("lr", "categories", "test-per-category"):
        old.pop(name, None)
    with pytest.raises(FlexMoEError, match=r"before fixed test pools.*start a new run"):
        saved_settings(tmp_path, old)
