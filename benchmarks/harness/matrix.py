"""Benchmark matrices: methods x settings x seeds, each cell a set of ``flexmoe run`` settings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness.tuning import MAX_WIDENINGS, SWEEP_STAGES, Tuning, sweep_stage
from flexmoe.errors import FlexMoEError
from flexmoe.methods import METHODS
from flexmoe.schema import Scalar, kebab, snake
from flexmoe.settings import Settings

DEFAULT_ROOT = Path("benchmarks") / "results"
DEFAULT_SEEDS = (0, 1, 2)
FLEX_VARIANTS = ("flex", "flex-random", "flex-generic")


@dataclass(frozen=True)
class Group:
    """A named setting shared by the cells of one row of a matrix, e.g. a data split."""

    name: str
    overrides: dict[str, Scalar]


@dataclass(frozen=True)
class Cell:
    """One run of a matrix: a stable name and the Settings settings it changes."""

    name: str
    overrides: dict[str, Scalar]
    arm: str = ""  # the matrix arm it runs (ARMS), recorded beside its results

    def config(self) -> Settings:
        """The full settings of this cell (validated)."""
        return Settings().updated(self.overrides)

    def arguments(self) -> list[str]:
        """The ``flexmoe run`` options giving this cell's settings, sorted by name."""
        flat = {kebab(key): value for key, value in self.overrides.items()}
        return [part for key in sorted(flat) for part in (f"--{key}", str(flat[key]))]


@dataclass(frozen=True)
class Arm:
    """What a matrix runs under one name: a method, with settings of its own or at another
    method's tuned learning rate (an equal-rate control)."""

    method: str
    settings: dict[str, Scalar] = field(default_factory=dict)
    rate_of: str | None = None  # train at this method's tuned learning rate

    def settings_in(self, tuned: Tuning, name: str) -> dict[str, Scalar]:
        """This arm's settings beyond its method's tuned ones."""
        if self.rate_of is None:
            return dict(self.settings)
        rate = tuned.settings_for(self.rate_of).get("lr")
        if rate is None:
            raise FlexMoEError(
                f"{name} trains at {self.rate_of}'s tuned learning rate; give the sweep's "
                "tuned.json with --tuned"
            )
        return {**self.settings, "lr": rate}


ARMS: dict[str, Arm] = {
    **{method: Arm(method) for method in METHODS},
    # FLEx scoring only the answer tokens when it picks the expert to graft
    "flex-answer": Arm("flex", {"selection_tokens": "answer"}),
    # equal-rate controls: what the graft does, apart from what the learning rate does
    "flex-at-fedavg-lr": Arm("flex", rate_of="fedavg"),
    "fedavg-at-flex-lr": Arm("fedavg", rate_of="flex"),
    "fedsa-lora-at-flex-lr": Arm("fedsa-lora", rate_of="flex"),
}


@dataclass(frozen=True)
class Matrix:
    """Methods x groups x seeds, with settings every cell shares."""

    name: str
    methods: tuple[str, ...]
    groups: tuple[Group, ...]
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    overrides: dict[str, Scalar] = field(default_factory=dict)
    tuned: Tuning = field(default_factory=lambda: Tuning({}))  # per-method choices of a sweep

    def cells(self) -> list[Cell]:
        """Every cell, group-major; a group whose settings repeat an earlier one's is run once,
        and so is an arm whose settings are another's (an equal-rate control where the two
        methods chose the same rate)."""
        cells, seen, made = [], set(), set()
        for group in self.groups:
            key = Settings().updated(group.overrides)
            if key in seen:
                continue
            seen.add(key)
            for name in self.methods:
                arm = ARMS[name]
                tuned = {**self.tuned.settings_for(arm.method), **arm.settings_in(self.tuned, name)}
                for seed in self.seeds:
                    settings = {
                        **self.overrides,
                        **tuned,
                        **group.overrides,
                        "method": arm.method,
                        "seed": seed,
                    }
                    cell = Cell(f"{group.name}/{name}/seed{seed}", settings, name)
                    if cell.config() not in made:
                        made.add(cell.config())
                        cells.append(cell)
        return cells


SPLITS: dict[str, dict[str, Scalar]] = {
    "pathological": {"split": "pathological", "clients": 4},
    "dirichlet-1.0": {"split": "dirichlet", "alpha": 1.0, "clients": 10},
    "dirichlet-0.5": {"split": "dirichlet", "alpha": 0.5, "clients": 10},
}
ABLATIONS: dict[str, tuple[str, tuple[Scalar, ...]]] = {
    # varied setting: (split it is varied under, values)
    "experts-per-layer": ("pathological", (1, 2, 3)),
    "size-ratio": ("pathological", (0.25, 0.5, 1.0)),
    "gate-bias": ("pathological", (0.0, -2.0, -4.0)),
    "selection-tokens": ("pathological", ("all", "content", "answer")),
    "clients": ("dirichlet-1.0", (4, 10, 20)),
}
SMOKE_SETTINGS: dict[str, Scalar] = {
    "rounds": 2,
    "local_steps": 2,
    "max_train": 16,
    "max_test": 4,
    "max_new_tokens": 8,
}


def split_groups(names: Iterable[str] = SPLITS) -> tuple[Group, ...]:
    """The named splits as matrix groups."""
    return tuple(Group(name, SPLITS[name]) for name in names)


def ablation_groups() -> tuple[Group, ...]:
    """One group per value of every ablated setting, on top of that ablation's split."""
    return tuple(
        Group(f"{setting}-{value}", {**SPLITS[split], snake(setting): value})
        for setting, (split, values) in ABLATIONS.items()
        for value in values
    )


# FLEx made client-level DP (flexmoe.federated.strategies), beside FLEx as it is
PRIVATE = Group(
    "pathological-dp",
    {**SPLITS["pathological"], "dp_noise_multiplier": 1.0, "dp_clipping_norm": 1.0},
)

MATRICES: dict[str, Matrix] = {
    "default": Matrix("default", tuple(METHODS), split_groups()),
    "ablations": Matrix("ablations", ("flex",), ablation_groups()),
    "privacy": Matrix(
        "privacy", ("flex",),
        (*split_groups(["pathological"]), PRIVATE),
    ),
    "smoke": Matrix(
        "smoke", ("flex", "fedavg", "fedavg-full"), split_groups(["pathological"]), (0, 1, 2),
        dict(SMOKE_SETTINGS),
    ),
}  # fmt: skip


SWEEP = "sweep"  # the hyperparameter sweep (benchmarks.harness.tuning), run stage by stage


def sweep_cells(
    stage: int,
    tuning: Tuning,
    overrides: dict[str, Scalar],
    methods: Sequence[str] | None = None,
    max_widenings: int = MAX_WIDENINGS,
) -> list[Cell]:
    """The cells of one stage of the sweep on the pathological split, with shared settings."""
    cells = [
        Cell(f"{name}/seed0", {**overrides, **SPLITS["pathological"], **settings})
        for name, settings in sweep_stage(stage, tuning, max_widenings, methods)
    ]
    for cell in cells:
        cell.config()  # refuse bad settings before anything runs
    return cells


SWEEP_STAGE_COUNT = len(SWEEP_STAGES)


def select(
    matrix: Matrix,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    groups: Sequence[str] | None = None,
    overrides: dict[str, Scalar] | None = None,
    tuned: Tuning | None = None,
) -> Matrix:
    """``matrix`` narrowed to some methods, seeds and groups, with extra shared settings and
    each method's ``tuned`` choices.

    A group is kept when its name is one of ``groups`` or starts with one of them and a dash
    (``dirichlet`` keeps ``dirichlet-1.0`` and ``dirichlet-0.5``).
    """
    for method in methods or ():
        if method not in ARMS:
            raise FlexMoEError(f"unknown method {method!r}; choose from {', '.join(ARMS)}")
    kept = matrix.groups
    if groups:
        kept = tuple(g for g in matrix.groups if any(_matches(g.name, s) for s in groups))
        if not kept:
            known = ", ".join(g.name for g in matrix.groups)
            raise FlexMoEError(f"no group of matrix {matrix.name!r} matches {groups}; {known}")
    selected = Matrix(
        matrix.name,
        tuple(methods) if methods else matrix.methods,
        kept,
        tuple(seeds) if seeds else matrix.seeds,
        {**matrix.overrides, **(overrides or {})},
        tuned or matrix.tuned,
    )
    for cell in selected.cells():
        cell.config()  # refuse bad settings before anything runs
    return selected


def _matches(name: str, wanted: str) -> bool:
    return name == wanted or name.startswith(f"{wanted}-")
