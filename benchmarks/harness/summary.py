"""A benchmark folder's runs: read through the results contract, grouped by setting and method.

Everything here is plain Python over the JSON records (no torch), so a report can be written on
any machine that has the results.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_text, read_json
from flexmoe.methods import METHODS
from flexmoe.results import (
    CLIENTS_DIR,
    RESULTS_FILE,
    ROUNDS_FILE,
    ClientResult,
    RoundRecord,
    Routing,
    RoutingStatistics,
    RunResults,
    read_results,
    read_rounds,
)
from flexmoe.schema import kebab, snake
from flexmoe.settings import RUNTIME_SETTINGS, Settings, as_saved

PLOTS_DIR = "plots"
# the settings only some methods use, beside the learning rate every method uses
OWN_HYPERPARAMETERS = {
    "fedprox": ("proximal_mu",),
    **{m: ("server_lr",) for m in ("fedadam", "fedyogi", "fedadagrad")},
}
SAMPLES = 2  # test predictions per client shown in a report
PREDICTIONS_FILE = "predictions.jsonl"  # every test example's prediction and ROUGE-L
SAMPLES_FILE = "samples.json"  # the first two, cut short: what cells made before kept


# graft settings that make a variant of a method within a setting (its own arm, compared on the
# same test examples), not a setting of their own
ARM_FIELDS = ("experts_per_layer", "size_ratio", "gate_bias", "selection_tokens")
ABLATION_FIELDS = ("clients",)  # settings compared across settings (other data, other examples)

RUN_FIELDS = ("method", "seed")  # what differs between runs of one setting's tables
# what a run measures, not what it trains: runs that differ only here share a setting
MEASUREMENT_FIELDS = ("eval_every", "diagnostics", "mmlu_per_topic")
# a method's own hyperparameters, tuned per method (benchmarks.harness.tuning): methods compare
# in one table whatever their values, which the table shows
METHOD_FIELDS = ("lr", "proximal_mu", "server_lr")
RUNTIME_FIELDS = tuple(snake(s) for s in RUNTIME_SETTINGS)  # no bearing on results


@dataclass(frozen=True)
class Run:
    """One finished run: its results.json, its rounds.json if any, and where it lies."""

    path: str  # the folder, relative to the report's folder
    results: RunResults
    rounds: list[RoundRecord] | None
    samples: dict[int, list[dict]] = field(default_factory=dict)  # client -> first predictions
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # client -> id -> ROUGE-L
    commits: tuple[str, ...] = ()  # the code each start of the run ran at ('*': with changes)
    arm: str = ""  # the matrix arm the bench ran it as, where it recorded one

    @property
    def method(self) -> str:
        return self.results.method

    @property
    def config(self) -> dict:
        """The run's settings; a setting newer than the run reads as the value it ran with
        (``flexmoe.settings.ADDED_LATER``: mostly the default)."""
        top = {k: getattr(self.results, k) for k in ("split", "alpha", "seed")}
        top = {k: v for k, v in top.items() if v is not None}
        saved = self.results.config
        defaults = Settings().to_record() if saved else {}
        return {**defaults, **top, "method": self.method, **(as_saved(saved) if saved else {})}

    def setting(self) -> Setting:
        ignored = RUN_FIELDS + MEASUREMENT_FIELDS + METHOD_FIELDS + RUNTIME_FIELDS + ARM_FIELDS
        return tuple(sorted((k, v) for k, v in self.config.items() if k not in ignored))

    def variant(self) -> str:
        """The run's method and the graft settings it changes from their defaults, e.g.
        ``flex (selection-tokens answer)``."""
        defaults = Settings().to_record()
        changed = [
            f"{kebab(name)} {self.config[name]}"
            for name in ARM_FIELDS
            if self.config.get(name, defaults[name]) != defaults[name]
        ]
        return f"{self.method} ({', '.join(changed)})" if changed else self.method


Setting = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Summary:
    """Mean and spread over the runs (seeds) of one method in one setting."""

    runs: tuple[Run, ...]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def rouge(self) -> float:
        return statistics.fmean(r.results.mean_rouge_l for r in self.runs)

    @property
    def rouge_std(self) -> float | None:
        """Sample standard deviation of mean ROUGE-L over runs; None below two runs."""
        values = [r.results.mean_rouge_l for r in self.runs]
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def ppl_increase(self) -> float | None:
        return mean_or_none(r.results.mean_ppl_increase for r in self.runs)

    def traffic(self, key: str) -> float:
        """Mean bytes per run, ``bytes_up`` or ``bytes_down``."""
        return statistics.fmean(getattr(r.results.comm, key) for r in self.runs)

    def clients(self) -> list[ClientResult]:
        """Every client record of every run."""
        return [client for run in self.runs for client in run.results.clients]

    @property
    def flops_ratio(self) -> float | None:
        return mean_or_none(r.results.flops_ratio for r in self.runs)

    def hyperparameters(self) -> str:
        """The method's own hyperparameters as its runs set them (those it uses), e.g.
        ``lr 0.001, proximal-mu 0.1``."""
        parts = []
        for name in ("lr", *OWN_HYPERPARAMETERS.get(self.runs[0].method, ())):
            values = sorted({r.config[name] for r in self.runs})
            parts.append(f"{kebab(name)} {' / '.join(f'{v:g}' for v in values)}")
        return ", ".join(parts)

    def client_rouge(self) -> dict[int, float]:
        """Each client's ROUGE-L, mean over the runs that evaluated it."""
        scores: dict[int, list[float]] = {}
        for run in self.runs:
            for client in run.results.clients:
                scores.setdefault(client.client_id, []).append(client.rouge_l)
        return {cid: statistics.fmean(values) for cid, values in sorted(scores.items())}


def mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def load_runs(directory: Path) -> list[Run]:
    """Every results.json under ``directory``, in the order of their paths."""
    runs = []
    for path in sorted(
        directory.rglob(RESULTS_FILE), key=lambda p: p.relative_to(directory).as_posix()
    ):
        rounds_file = path.with_name(ROUNDS_FILE)
        rounds = read_rounds(rounds_file) if rounds_file.is_file() else None
        folder = path.parent.relative_to(directory).as_posix()
        results = read_results(path)
        kept = read_predictions(path.parent)
        samples = {c: rows[:SAMPLES] for c, rows in kept.items()}
        scores = {c: {r["prompt_id"]: r["rouge_l"] for r in rows} for c, rows in kept.items()}
        samples = samples or read_samples(path.parent)
        arm, starts = read_provenance(path.parent)
        commits = tuple(
            (start["commit"] or "?")[:7] + ("*" if start["uncommitted_changes"] else "")
            for start in starts
        )
        runs.append(Run(folder, results, rounds, samples, scores, commits, arm))
    return runs


PREDICTED = ("prompt_id", "category", "rouge_l", "prediction")  # what a cell keeps of each


def write_predictions(folder: Path) -> Path | None:
    """``folder/predictions.jsonl``: every test example of each client's final evaluation, one
    line each (client, prompt id, category, ROUGE-L, prediction), from the files the run's
    clients kept beside their state (a simulation's clients keep them in its folder). The prompt
    and reference are left out: the prompt id names them in the data set. None when the clients
    kept no predictions."""
    lines = [
        json.dumps({"client": int(client), **{key: row[key] for key in PREDICTED}})
        for client, rows in final_predictions(folder).items()
        for row in rows
    ]
    if not lines:
        return None
    return atomic_write_text(folder / PREDICTIONS_FILE, "\n".join(lines) + "\n")


def read_predictions(folder: Path) -> dict[int, list[dict]]:
    """What ``write_predictions`` kept for the run in ``folder``, by client (nothing if none)."""
    path = folder / PREDICTIONS_FILE
    if not path.is_file():
        return {}
    kept: dict[int, list[dict]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            kept.setdefault(int(row.pop("client")), []).append(row)
        except (ValueError, KeyError, TypeError) as error:
            raise FlexMoEError(
                f"{path}, line {number}: not a prediction record ({error}); delete the file and "
                "run 'python -m benchmarks.bench' again to make it"
            ) from None
    return kept


def final_predictions(folder: Path) -> dict[str, list[dict]]:
    """Each client's rows of its final evaluation's predictions, as the clients kept them beside
    their state (a simulation's clients keep them in its folder)."""
    results = read_results(folder / RESULTS_FILE)
    predictions = {}
    for client in results.clients:
        name = f"client-{client.client_id}/predictions/round-{results.rounds:04d}.jsonl"
        for file in sorted(folder.glob(f"{CLIENTS_DIR}/*/{name}"))[:1]:
            lines = file.read_text(encoding="utf-8").splitlines()
            predictions[str(client.client_id)] = [json.loads(line) for line in lines]
    return predictions


def provenance_path(folder: Path) -> Path:
    """Where the bench records a cell's arm and starts: beside its folder, as its log."""
    return folder.with_name(f"{folder.name}.provenance.json")


def read_provenance(folder: Path) -> tuple[str, list[dict]]:
    """The arm and the starts recorded for the cell in ``folder`` (none for a run the bench
    did not make, or made before it recorded them)."""
    path = provenance_path(folder)
    if not path.is_file():
        return "", []
    kept = read_json(path, "delete it: the bench writes it again at the cell's next start")
    try:
        return str(kept["arm"]), list(kept["starts"])
    except (KeyError, TypeError) as error:
        raise FlexMoEError(f"{path}: not a provenance record ({error!r}); delete it") from None


def read_samples(folder: Path) -> dict[int, list[dict]]:
    """What ``samples.json`` keeps of the first test predictions of each client, in a cell made
    before cells kept all their predictions."""
    path = folder / SAMPLES_FILE
    if not path.is_file():
        return {}
    return {
        int(k): v
        for k, v in read_json(path, "run 'python -m benchmarks.bench' again to make it").items()
    }


def split_sweep(runs: Sequence[Run]) -> tuple[list[Run], list[Run]]:
    """``(runs scored on their test splits, runs of a sweep, scored on validation splits)``."""
    tested, sweep = [], []
    for run in runs:
        (sweep if run.config.get("eval_split") == "validation" else tested).append(run)
    return tested, sweep


def method_order(names: Iterable[str]) -> list[str]:
    """Methods in the order of the METHODS table, unknown ones after it alphabetically."""

    known = list(METHODS)
    return sorted(set(names), key=lambda m: (known.index(m) if m in known else len(known), m))


def split_label(config: dict) -> str:
    split = config.get("split", "?")
    return f"dirichlet-{float(config['alpha'])}" if split == "dirichlet" else split


def setting_labels(settings: Iterable[Setting]) -> dict[Setting, str]:
    """A short unique name per setting: its split, then what varies between settings of it."""
    by_split: dict[str, list[dict]] = {}
    for setting in settings:
        by_split.setdefault(split_label(dict(setting)), []).append(dict(setting))
    labels = {}
    for split, configs in by_split.items():
        varied = _varied_fields(configs)
        for config in configs:
            parts = [split, *(f"{kebab(f)} {config.get(f)}" for f in varied)]
            labels[tuple(sorted(config.items()))] = ", ".join(parts)
    return labels


def _varied_fields(configs: list[dict]) -> list[str]:
    names = sorted({name for config in configs for name in config})
    return [n for n in names if len({repr(c.get(n)) for c in configs}) > 1]


def _setting_order(setting: Setting) -> tuple:
    config = dict(setting)
    numbers = tuple((k, v) for k, v in setting if isinstance(v, int | float))
    return (
        config.get("split") != "pathological",
        -float(config.get("alpha", 0)),
        numbers,
        repr(setting),
    )


def group_runs(runs: Iterable[Run]) -> dict[Setting, dict[str, Summary]]:
    """Runs by setting, then by arm (``arms``), settings and arms in report order."""
    grouped: dict[Setting, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.setting(), []).append(run)
    return {setting: arms(grouped[setting]) for setting in sorted(grouped, key=_setting_order)}


def arms(runs: Sequence[Run]) -> dict[str, Summary]:
    """A setting's runs by arm: the one the bench recorded (``flex-at-fedavg-lr``), else their
    ``variant``, and where one variant ran at several learning rates, each rate apart."""
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.arm or run.variant(), []).append(run)
    named: dict[str, list[Run]] = {}
    for variant, members in by_variant.items():
        several = len({r.config["lr"] for r in members}) > 1
        for run in members:
            label = f"{variant}, lr {run.config['lr']:g}" if several else variant
            named.setdefault(label, []).append(run)
    order = {m: i for i, m in enumerate(method_order(r.method for r in runs))}
    ranked = sorted(named, key=lambda label: (order[named[label][0].method], label))
    return {label: Summary(tuple(named[label])) for label in ranked}


def ablation_families(
    grouped: dict[Setting, dict[str, Summary]],
) -> list[tuple[str, list[Setting]]]:
    """Sets of settings that differ in one ablated field only, with at least two of its values."""
    families = []
    for name in ABLATION_FIELDS:
        by_rest: dict[Setting, list[Setting]] = {}
        for setting in grouped:
            rest = tuple((k, v) for k, v in setting if k != name)
            by_rest.setdefault(rest, []).append(setting)
        for members in by_rest.values():
            if len(members) > 1:
                families.append((name, sorted(members, key=lambda s: dict(s)[name])))
    return families


def family_label(label: str, name: str) -> str:
    """A setting's label without the ablated field."""
    return ", ".join(p for p in label.split(", ") if not p.startswith(f"{kebab(name)} "))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text.replace(", ", "-"))


def ablation_plot(label: str, name: str) -> str:
    return f"ablation-{kebab(name)}-{_slug(family_label(label, name))}.png"


def setting_plots(label: str) -> dict[str, str]:
    """The plot files of one setting, by kind."""
    slug = _slug(label)
    return {kind: f"{slug}-{kind}.png" for kind in ("curves", "clients", "quality-vs-uplink")}


def routing_summary(routed: list[Routing]) -> dict[str, float | None]:
    """Entropies before and after, and the grafted gates' mean, over clients, layers and seeds."""

    def mean_of(stage: str, key: str) -> float:
        layers = [layer for r in routed for layer in getattr(r, stage).layers]
        return statistics.fmean(getattr(layer, key) for layer in layers)

    gates = [g for r in routed for layer in r.final.layers for g in layer.gate_means]
    entropies = {
        f"{key}_{stage}": mean_of(stage, key)
        for key in ("utilisation_entropy", "token_entropy")
        for stage in ("base", "final")
    }
    return {**entropies, "gate": mean_or_none(gates)}


def layer_shifts(routed: list[Routing]) -> dict[int, list[float]]:
    """Per MoE layer, every client's total-variation distance of utilisation, base to final."""
    shifts: dict[int, list[float]] = {}
    for record in routed:
        for layer, distance in utilisation_shift(record.base, record.final).items():
            shifts.setdefault(layer, []).append(distance)
    return dict(sorted(shifts.items()))


def utilisation_shift(before: RoutingStatistics, after: RoutingStatistics) -> dict[int, float]:
    """Per layer, the total-variation distance between two models' expert utilisation."""
    return {
        old.layer: 0.5
        * sum(abs(a - b) for a, b in zip(old.utilisation, new.utilisation, strict=True))
        for old, new in zip(before.layers, after.layers, strict=True)
    }


def selection_agreement(runs: Iterable[Run]) -> tuple[float, float] | None:
    """Over the MoE layers of ``runs``: the mean number of distinct grafted experts among a run's
    clients, and the mean share of client pairs grafting different ones; None without grafts."""
    distinct, differing = [], []
    for run in runs:
        plans = [c.grafted_experts for c in run.results.clients if c.grafted_experts]
        for layer in plans[0] if len(plans) > 1 else ():
            choices = [tuple(plan.get(layer, ())) for plan in plans]
            pairs = list(itertools.combinations(choices, 2))
            distinct.append(len(set(choices)))
            differing.append(sum(a != b for a, b in pairs) / len(pairs))
    if not distinct:
        return None
    return statistics.fmean(distinct), statistics.fmean(differing)
