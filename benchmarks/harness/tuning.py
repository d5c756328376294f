"""Fair baselines: each method's hyperparameter chosen on validation data, before the matrix.

A sweep runs each method at a few values of its most sensitive setting (the client learning rate,
FedProx's mu, the server learning rate of FedAdam) on one seed, scoring every client's
*validation* split (``eval-split = "validation"``, carved from its training share, so the test
split is never seen), and keeps the value with the best mean ROUGE-L. Methods that differ from
another only where they are swept inherit the rest: FLEx's ablations train exactly as FLEx, and the
server-side variants of FedAvg train their clients exactly as FedAvg, so they take its learning
rate. ``tuned.json`` records every value's score and the choice; ``python -m benchmarks.bench
--tuned`` applies the choices to a matrix.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.summary import Run, load_runs
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_text, read_json
from flexmoe.schema import Scalar, kebab, snake

TUNED_FILE = "tuned.json"
LORA_LRS = (3e-4, 1e-3, 3e-3)
# method: (setting swept, its values); a later stage starts from the choices of the earlier ones
SWEEP_STAGES: tuple[dict[str, tuple[str, tuple[float, ...]]], ...] = (
    {
        "flex": ("lr", LORA_LRS),
        "fedavg": ("lr", LORA_LRS),
        "fedsa-lora": ("lr", LORA_LRS),
        "local": ("lr", LORA_LRS),
        # every weight trains: a LoRA rate would wreck the pretrained experts
        "fedavg-full": ("lr", (1e-5, 3e-5, 1e-4)),
    },
    {
        "fedprox": ("proximal-mu", (0.01, 0.1, 1.0)),
        "fedadam": ("server-lr", (1e-3, 1e-2, 1e-1)),
    },
)
# a method that trains as another takes that one's choices, then its own
INHERITS = {
    "flex-random": "flex",
    "flex-generic": "flex",
    **{m: "fedavg" for m in ("fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")},
}
MAX_WIDENINGS = 2  # half-decades a grid may grow by beyond its ends: a decade at most
SWEEP_SETTINGS: dict[str, Scalar] = {"eval_split": "validation", "diagnostics": False, "seed": 0}


@dataclass(frozen=True)
class Choice:
    """One method's swept setting: the mean validation ROUGE-L of each value, and the best."""

    setting: str
    scores: dict[str, float]  # the value as text -> mean validation ROUGE-L
    chosen: float


@dataclass(frozen=True)
class Tuning:
    """The choices of a sweep, per method."""

    choices: dict[str, Choice]

    def settings_for(self, method: str) -> dict[str, Scalar]:
        """The tuned settings of ``method``: its parent's choices, then its own."""
        settings = {}
        parent = INHERITS.get(method)
        if parent in self.choices:
            settings[snake(self.choices[parent].setting)] = self.choices[parent].chosen
        if method in self.choices:
            settings[snake(self.choices[method].setting)] = self.choices[method].chosen
        return settings


def choose(runs: Iterable[Run]) -> Tuning:
    """The best value of each method's swept setting among finished sweep ``runs``.

    Ties go to the smaller value.
    """
    scores: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        swept = _swept(run.method)
        if swept is None or run.config.get("eval_split") != "validation":
            continue
        value = float(run.config[snake(swept[0])])
        scores.setdefault(run.method, {}).setdefault(value, []).append(run.results.mean_rouge_l)
    choices = {}
    for method, by_value in scores.items():
        means = {v: statistics.fmean(by_value[v]) for v in sorted(by_value)}
        best = max(means, key=lambda v: (means[v], -v))
        choices[method] = Choice(_swept(method)[0], {_text(v): means[v] for v in means}, best)
    return Tuning(choices)


def swept_values(method: str, tuning: Tuning, max_widenings: int = MAX_WIDENINGS) -> list[float]:
    """The values to sweep ``method`` over: its grid, and a half-decade beyond an end of it
    while the best value so far is at that end (an optimum at the edge may lie outside), at
    most ``max_widenings`` times."""
    values = list(_swept(method)[1])
    choice = tuning.choices.get(method)
    if choice is None:
        return values
    for _ in range(max_widenings):
        if not all(_text(v) in choice.scores for v in values):
            break
        if choice.chosen >= values[-1]:
            values.append(_half_decade(values[-1], up=True))
        elif choice.chosen <= values[0]:
            values.insert(0, _half_decade(values[0], up=False))
        else:
            break
    return values


def at_edge(choice: Choice) -> bool:
    """Whether the choice is the largest or smallest value swept (the optimum may lie outside)."""
    swept = sorted(float(v) for v in choice.scores)
    return len(swept) > 1 and choice.chosen in (swept[0], swept[-1])


def _half_decade(value: float, up: bool) -> float:
    """The next value of the 1-3-10 sequence above or below ``value``."""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = round(value / 10**exponent)
    steps = {(1, True): 3, (3, True): 10, (3, False): 1, (1, False): 0.3}
    return float(f"{steps[mantissa, up] * 10**exponent:.3g}")


def sweep_stage(
    stage: int,
    tuning: Tuning,
    max_widenings: int = MAX_WIDENINGS,
    methods: Collection[str] | None = None,
) -> list[tuple[str, dict[str, Scalar]]]:
    """``(cell name, settings)`` of stage ``stage`` of the sweep (of ``methods`` only, when
    given), on ``tuning``'s choices so far (the earlier stages', and this one's, which may widen
    its grid)."""
    cells = []
    for method, (setting, _) in SWEEP_STAGES[stage].items():
        if methods and method not in methods:
            continue
        inherited = tuning.settings_for(INHERITS[method]) if method in INHERITS else {}
        if method in INHERITS and not inherited:
            raise FlexMoEError(
                f"sweeping {method} needs the learning rate chosen for {INHERITS[method]}; "
                "its stage has no finished cell"
            )
        for value in swept_values(method, tuning, max_widenings):
            settings = {**SWEEP_SETTINGS, **inherited, "method": method, snake(setting): value}
            cells.append((f"{method}/{setting}-{_text(value)}", settings))
    return cells


def write_tuning(folder: Path, tuning: Tuning) -> Path:
    """``folder/tuned.json``: every score and choice, written atomically."""
    plain = {
        method: {"setting": c.setting, "scores": c.scores, "chosen": c.chosen}
        for method, c in sorted(tuning.choices.items())
    }
    return atomic_write_text(folder / TUNED_FILE, json.dumps(plain, indent=2) + "\n")


def read_tuning(path: Path) -> Tuning:
    """The choices in a ``tuned.json`` that ``python -m benchmarks.bench --matrix sweep`` wrote."""
    data = read_json(
        path, "give the tuned.json that 'python -m benchmarks.bench --matrix sweep' wrote"
    )
    try:
        choices = {
            method: Choice(str(c["setting"]), dict(c["scores"]), float(c["chosen"]))
            for method, c in data.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise FlexMoEError(f"{path}: not a tuned.json ({error!r}); re-run the sweep") from None
    for method, choice in choices.items():
        if _swept(method) is None or kebab(choice.setting) != _swept(method)[0]:
            raise FlexMoEError(f"{path}: {method} was not swept over {choice.setting!r}")
    return Tuning(choices)


def tuning_of(folder: Path) -> Tuning:
    """The choices among the finished sweep cells under ``folder``."""
    return choose(load_runs(folder)) if folder.is_dir() else Tuning({})


def _swept(method: str) -> tuple[str, tuple[float, ...]] | None:
    for stage in SWEEP_STAGES:
        if method in stage:
            return stage[method]
    return None


def _text(value: float) -> str:
    return f"{value:g}"
