"""Resolving a run (flexmoe.federated.run): a run in its folder, other settings, fewer rounds,
a damaged server state, all refused before any process starts."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from flexmoe.cli import main
from flexmoe.errors import FlexMoEError
from flexmoe.federated.run import Resume, resolve_run
from flexmoe.results import Checkpoint, write_checkpoint
from flexmoe.settings import Settings


def saved_run(folder, **settings) -> Settings:
    """A folder holding run 'abc' at round 1 of ``settings``."""
    config = Settings.of(**settings)
    write_checkpoint(folder, Checkpoint(run_id="abc", config=config.to_record(), round=1))
    (folder / "checkpoints").mkdir()
    for kind in ("shared", "strategy"):
        save_file(
            {"w": np.zeros(2)}, str(folder / "checkpoints" / f"{kind}-round-0001.safetensors")
        )
    return config


def test_a_folder_holding_a_run_is_not_reused_without_resume(tmp_path, capsys):
    saved_run(tmp_path, rounds=3)
    assert main(["run", "--out", str(tmp_path), "--method", "fedavg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds run abc (round 1 of 3, method flex)" in err
    assert f"continue it with --resume {tmp_path}" in err


def test_resume_refuses_other_settings_but_may_change_the_rounds_and_the_reply_timeout(
    tmp_path, capsys
):
    config = saved_run(tmp_path, rounds=3)
    resumed = config.updated({"rounds": 5, "reply-timeout": 600})
    assert resolve_run(tmp_path, resumed, resume=Resume.REQUIRED).saved.state.run_id == "abc"
    assert main(["run", "--resume", str(tmp_path), "--lr", "0.5", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings (seed 0 -> 3; lr 0.001 -> 0.5)" in err
    assert "(only --rounds and --reply-timeout may change)" in err


def test_finished_results_without_a_checkpoint_are_not_overwritten(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(FlexMoEError, match="holds the results of an earlier run"):
        resolve_run(tmp_path, Settings())
    empty = tmp_path / "empty"
    assert resolve_run(empty, resume=Resume.IF_SAVED).saved is None  # flwr run: a new run
    with pytest.raises(FlexMoEError, match="holds no run to resume"):
        resolve_run(empty, resume=Resume.REQUIRED)  # flexmoe run --resume


def test_resume_takes_neither_another_folder_nor_fewer_rounds_than_done(tmp_path, capsys):
    config = saved_run(tmp_path, rounds=3)
    assert main(["run", "--resume", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "give neither --config nor --out" in capsys.readouterr().err
    write_checkpoint(tmp_path, Checkpoint(run_id="abc", config=config.to_record(), round=3))
    (tmp_path / "checkpoints" / "shared-round-0001.safetensors").rename(
        tmp_path / "checkpoints" / "shared-round-0003.safetensors"
    )
    (tmp_path / "checkpoints" / "strategy-round-0001.safetensors").rename(
        tmp_path / "checkpoints" / "strategy-round-0003.safetensors"
    )
    with pytest.raises(FlexMoEError, match="cannot resume to 2 rounds"):
        resolve_run(tmp_path, config.updated({"rounds": 2}), resume=Resume.REQUIRED)


@pytest.mark.parametrize(
    "damage",
    [{"random_state": [3, [1, 2], None]}, {"random_state": [3, ["x"], None]}],
    ids=["short random state", "not numbers"],
)
def test_a_damaged_server_state_is_refused_when_the_run_is_resolved(tmp_path, damage):
    """Before any process starts: resolve_run restores the strategy and checks the rest."""
    config = saved_run(tmp_path, rounds=3)
    state = Checkpoint(run_id="abc", config=config.to_record(), round=1, **damage)
    write_checkpoint(tmp_path, state)
    with pytest.raises(FlexMoEError, match="the saved server state is damaged"):
        resolve_run(tmp_path, resume=Resume.REQUIRED)
