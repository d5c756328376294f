"""The learning-rate sweep: its stages, its choices on validation runs, its widening grid."""

import pytest

from benchmarks import bench
from benchmarks.harness import runner
from benchmarks.harness.matrix import MATRICES, select, sweep_cells
from benchmarks.harness.summary import Run
from benchmarks.harness.tuning import (
    Tuning,
    at_edge,
    choose,
    read_tuning,
    swept_values,
    tuning_of,
    write_tuning,
)
from flexmoe.errors import FlexMoEError
from tests.benchmarks.fakes import fake_command, fake_results, sweep_results, write_run


def test_the_sweep_chooses_on_validation_runs_and_methods_inherit_what_they_train_as(tmp_path):
    scores = {("flex", 3e-4): 20.0, ("flex", 1e-3): 31.0, ("flex", 3e-3): 31.0,
              ("fedavg", 3e-4): 25.0, ("fedavg", 1e-3): 12.0}  # fmt: skip
    for (method, lr), rouge in scores.items():
        folder = tmp_path / method / f"lr-{lr:g}" / "seed0"
        write_run(folder, sweep_results(method, "lr", lr, rouge))
    write_run(tmp_path / "test-split" / "seed0", fake_results("flex", 0, [99.0], lr=3e-4))
    tuning = tuning_of(tmp_path)
    assert tuning.choices["flex"].chosen == 1e-3  # a tie goes to the value swept first
    assert tuning.choices["flex"].scores == {"0.0003": 20.0, "0.001": 31.0, "0.003": 31.0}
    assert tuning.settings_for("flex-random") == {"lr": 1e-3}
    assert tuning.settings_for("fedyogi") == {"lr": 3e-4}
    assert tuning.settings_for("fedsa-lora") == {}  # not swept yet: its default
    stage_two = sweep_cells(1, tuning, {"rounds": 2})
    assert {c.overrides["method"] for c in stage_two} == {"fedprox", "fedadam"}
    assert all(c.overrides["lr"] == 3e-4 for c in stage_two)
    assert all(c.config().data.eval_split == "validation" for c in stage_two)
    assert "fedprox/proximal-mu-0.1/seed0" in [c.name for c in stage_two]
    with pytest.raises(FlexMoEError, match="needs the learning rate chosen for fedavg"):
        sweep_cells(1, Tuning({}), {})
    assert sweep_cells(1, Tuning({}), {}, ["flex"]) == []  # no fedprox asked for: nothing needed

    written = write_tuning(tmp_path, tuning)
    assert read_tuning(written) == tuning
    tuned = select(MATRICES["default"], ["flex", "fedprox"], [0], ["pathological"], tuned=tuning)
    assert [c.overrides.get("lr") for c in tuned.cells()] == [1e-3, 3e-4]
    written.write_text('{"flex": {"setting": "proximal-mu", "scores": {}, "chosen": 1}}')
    with pytest.raises(FlexMoEError, match="flex was not swept over 'proximal-mu'"):
        read_tuning(written)


@pytest.mark.slow
def test_the_sweep_command_runs_its_stages_in_order_and_writes_its_choices(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(runner, "flexmoe_command", fake_command())
    argv = ["--matrix", "sweep", "--out", str(tmp_path), "--rounds", "1"]
    assert bench.main([*argv, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "flex/lr-0.001/seed0" in listed and "--eval-split validation" in listed
    assert "stage 2 starts from the choices of stage 1" in listed
    assert bench.main([*argv, "--methods", "fedavg,fedprox"]) == 0
    tuned = read_tuning(tmp_path / "sweep" / "tuned.json")
    assert set(tuned.choices) == {"fedavg", "fedprox"}
    assert (tmp_path / "sweep" / "fedprox" / "proximal-mu-1" / "seed0" / "results.json").is_file()
    assert bench.main([*argv, "--seeds", "1"]) == 2
    assert "the sweep runs seed 0" in capsys.readouterr().err


def test_a_choice_at_an_end_of_its_grid_widens_the_grid_by_half_decades_twice_at_most(tmp_path):
    def tuned(scores: dict[float, float]) -> Tuning:
        return choose(
            [Run(f"{v}", sweep_results("flex", "lr", v, r), None) for v, r in scores.items()]
        )

    assert swept_values("flex", tuned({3e-4: 1.0, 1e-3: 2.0})) == [3e-4, 1e-3, 3e-3]  # unfinished
    assert swept_values("flex", tuned({3e-4: 1.0, 1e-3: 3.0, 3e-3: 2.0})) == [3e-4, 1e-3, 3e-3]
    assert swept_values("flex", tuned({3e-4: 1.0, 1e-3: 2.0, 3e-3: 3.0})) == [
        3e-4,
        1e-3,
        3e-3,
        1e-2,
    ]
    assert swept_values("flex", tuned({3e-4: 3.0, 1e-3: 2.0, 3e-3: 1.0})) == [
        1e-4,
        3e-4,
        1e-3,
        3e-3,
    ]
    inside = tuned({3e-4: 1.0, 1e-3: 2.0, 3e-3: 4.0, 1e-2: 3.0})
    assert swept_values("flex", inside) == [3e-4, 1e-3, 3e-3, 1e-2]  # the best is inside now
    once = tuned({3e-4: 1.0, 1e-3: 2.0, 3e-3: 3.0, 1e-2: 4.0})
    assert swept_values("flex", once) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    twice = tuned({3e-4: 1.0, 1e-3: 2.0, 3e-3: 3.0, 1e-2: 4.0, 3e-2: 5.0})
    assert swept_values("flex", twice) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # a decade at most
    assert at_edge(twice.choices["flex"]) and twice.choices["flex"].chosen == 3e-2
    low = tuned({1e-4: 4.0, 3e-4: 3.0, 1e-3: 2.0, 3e-3: 1.0})
    assert swept_values("flex", low) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
    assert swept_values("fedadam", Tuning({})) == [1e-3, 1e-2, 1e-1]
    at_top = tuned({3e-4: 1.0, 1e-3: 2.0, 3e-3: 3.0})
    assert swept_values("flex", at_top, max_widenings=0) == [3e-4, 1e-3, 3e-3]  # the cut grid
    with pytest.raises(SystemExit):  # more than the report's "up to" is refused
        bench.build_parser().parse_args(["--matrix", "sweep", "--max-widenings", "3"])
