"""Benchmark matrices: their cells, narrowed and with shared settings."""

import pytest

from benchmarks.harness.matrix import MATRICES, Cell, select
from benchmarks.harness.tuning import Choice, Tuning
from flexmoe.errors import FlexMoEError
from flexmoe.methods import METHODS


def test_default_matrix_covers_every_method_split_and_seed():
    cells = MATRICES["default"].cells()
    assert len(cells) == len(METHODS) * 3 * 3
    assert len({c.name for c in cells}) == len(cells)
    by_name = {c.name: c for c in cells}
    config = by_name["dirichlet-0.5/flex-generic/seed2"].config()
    chosen = (config.data.split, config.data.alpha, config.federation.clients, config.seed)
    assert chosen == ("dirichlet", 0.5, 10, 2)
    assert by_name["pathological/fedavg-full/seed0"].config().federation.clients == 4


def test_smoke_matrix_is_small_and_ablations_run_each_setting_once():
    smoke = MATRICES["smoke"].cells()
    assert [c.name for c in smoke[:3]] == [f"pathological/flex/seed{s}" for s in (0, 1, 2)]
    assert {c.overrides["method"] for c in smoke} == {"flex", "fedavg", "fedavg-full"}
    assert all(c.config().federation.rounds <= 2 and c.config().data.max_train <= 16 for c in smoke)
    names = [c.name for c in MATRICES["ablations"].cells()]
    assert "experts-per-layer-3/flex/seed1" in names and "clients-20/flex/seed0" in names
    assert "size-ratio-0.25/flex/seed2" in names
    assert not any(n.startswith("size-ratio-1.0/") for n in names)  # same as experts-per-layer-1
    config = {c.name: c.config() for c in MATRICES["ablations"].cells()}
    assert config["clients-20/flex/seed0"].federation.clients == 20
    assert config["clients-20/flex/seed0"].data.split == "dirichlet"


def test_select_narrows_a_matrix_and_applies_shared_settings():
    matrix = select(MATRICES["default"], ["flex", "fedavg"], [7], ["dirichlet"], {"rounds": 3})
    names = [c.name for c in matrix.cells()]
    assert names == [f"dirichlet-{a}/{m}/seed7" for a in ("1.0", "0.5") for m in ("flex", "fedavg")]
    assert all(c.config().federation.rounds == 3 for c in matrix.cells())
    assert Cell("x", {"rounds": 3, "method": "flex"}).arguments() == [
        "--method", "flex", "--rounds", "3"
    ]  # fmt: skip
    with pytest.raises(FlexMoEError, match="unknown method"):
        select(MATRICES["smoke"], ["nope"])
    with pytest.raises(FlexMoEError, match="no group"):
        select(MATRICES["smoke"], groups=["dirichlet"])
    with pytest.raises(FlexMoEError, match="local-steps must be at least 1"):
        select(MATRICES["smoke"], overrides={"local_steps": 0})


def test_arms_run_a_method_with_its_own_settings_or_another_methods_tuned_rate():
    tuned = Tuning({m: Choice("lr", {}, rate) for m, rate in (("flex", 1e-3), ("fedavg", 3e-4))})
    arms = ["flex", "flex-answer", "flex-at-fedavg-lr", "fedavg-at-flex-lr"]
    matrix = select(MATRICES["default"], arms, [0], ["pathological"], tuned=tuned)
    config = {c.name.split("/")[1]: c.config() for c in matrix.cells()}
    assert [(c.method, c.train.lr) for c in config.values()] == [
        ("flex", 1e-3), ("flex", 1e-3), ("flex", 3e-4), ("fedavg", 1e-3),
    ]  # fmt: skip
    assert config["flex-answer"].graft.selection_tokens == "answer"
    same = Tuning({m: Choice("lr", {}, 1e-3) for m in ("flex", "fedavg")})
    matrix = select(MATRICES["default"], ["flex", "flex-at-fedavg-lr"], [0], tuned=same)
    assert [c.name for c in matrix.cells()] == [  # the control is flex itself: run once
        f"{split}/flex/seed0" for split in ("pathological", "dirichlet-1.0", "dirichlet-0.5")
    ]
    with pytest.raises(FlexMoEError, match="trains at fedavg's tuned learning rate; give"):
        select(MATRICES["default"], ["flex-at-fedavg-lr"], [0])
    with pytest.raises(FlexMoEError, match="unknown method 'flex-answr'; choose from"):
        select(MATRICES["default"], ["flex-answr"], [0])
