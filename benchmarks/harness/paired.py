"""Paired comparisons of two methods on the same test examples, with hierarchical bootstrap
intervals and a Holm correction across the comparisons of one claim.

A run's score is the mean over its clients of their mean per-example ROUGE-L, and a method's is
the mean over seeds; a comparison is the difference of the two on the examples both scored,
example by example. Its interval resamples what varies between repetitions of the benchmark:
the seeds, then each client's test examples within a seed (a hierarchical bootstrap).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flexmoe.errors import FlexMoEError

# seed -> client -> prompt id -> per-example score (ROUGE-L x 100)
Scores = Mapping[int, Mapping[int, Mapping[str, float]]]


@dataclass(frozen=True)
class Difference:
    """``first`` minus ``second`` on the same examples, and its bootstrap distribution."""

    mean: float
    draws: np.ndarray  # the bootstrap's means, one per draw
    seeds: int
    examples: int  # pairs per seed, summed over clients

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The percentile interval of the bootstrap at ``level``."""
        tail = 100 * (1 - level) / 2
        low, high = np.percentile(self.draws, [tail, 100 - tail])
        return float(low), float(high)

    @property
    def p_value(self) -> float:
        """Two-sided: twice the smaller share of draws on either side of zero (at least one
        draw's worth, so a bootstrap never claims p = 0)."""
        below = (np.count_nonzero(self.draws <= 0) + 1) / (len(self.draws) + 1)
        above = (np.count_nonzero(self.draws >= 0) + 1) / (len(self.draws) + 1)
        return min(1.0, 2 * min(below, above))


@dataclass(frozen=True)
class Verdict:
    """A comparison's interval at its Holm-adjusted level, and whether the step-down procedure
    rejects a zero difference."""

    difference: Difference
    low: float
    high: float
    level: float
    rejected: bool

    @property
    def supported(self) -> bool:
        """The first method is better: zero is rejected and the interval lies above it."""
        return self.rejected and self.low > 0


def paired_difference(
    first: Scores, second: Scores, draws: int = 4000, seed: int = 0
) -> Difference:
    """``first`` minus ``second``, paired on (seed, client, prompt id); both must have scored
    the same examples, or the comparison would not be paired."""
    pairs = _pairs(first, second)
    rng = np.random.default_rng(seed)
    runs = list(pairs.values())
    # slot j of a draw takes seed chosen[:, j], its examples resampled afresh for that slot
    chosen = rng.integers(len(runs), size=(draws, len(runs)))
    slots = [np.stack([_resampled_runs(run, draws, rng) for run in runs]) for _ in runs]
    means = np.mean([slot[chosen[:, j], np.arange(draws)] for j, slot in enumerate(slots)], axis=0)
    observed = float(np.mean([_run_mean(clients) for clients in runs]))
    examples = sum(len(d) for clients in runs for d in clients.values())
    return Difference(observed, means, len(runs), examples)


def holm(differences: Mapping[str, Difference], level: float = 0.95) -> dict[str, Verdict]:
    """Each comparison's interval at its Holm step-down level: the one with the smallest p-value
    at ``1 - alpha / m``, the next at ``1 - alpha / (m - 1)``, and so on; once an interval holds
    zero, neither it nor any later comparison rejects zero."""
    alpha, ordered = 1 - level, sorted(differences, key=lambda name: differences[name].p_value)
    verdicts, going = {}, True
    for rank, name in enumerate(ordered):
        adjusted = 1 - alpha / (len(ordered) - rank)
        low, high = differences[name].interval(adjusted)
        going = going and (low > 0 or high < 0)
        verdicts[name] = Verdict(differences[name], low, high, adjusted, rejected=going)
    return verdicts


def _pairs(first: Scores, second: Scores) -> dict[int, dict[int, np.ndarray]]:
    """Per seed and client, the per-example differences; the same examples on both sides."""
    if set(first) != set(second):
        raise FlexMoEError(f"seeds {sorted(first)} and {sorted(second)} differ: not paired")
    pairs: dict[int, dict[int, np.ndarray]] = {}
    for seed in sorted(first):
        a, b = first[seed], second[seed]
        if set(a) != set(b):
            raise FlexMoEError(f"seed {seed}: clients {sorted(a)} and {sorted(b)} differ")
        for client in sorted(a):
            if set(a[client]) != set(b[client]):
                raise FlexMoEError(
                    f"seed {seed}, client {client}: the two runs scored other test examples"
                )
            ids = sorted(a[client])
            if not ids:
                raise FlexMoEError(f"seed {seed}, client {client}: no test examples")
            delta = np.array([a[client][i] - b[client][i] for i in ids], dtype=float)
            pairs.setdefault(seed, {})[client] = delta
    if not pairs:
        raise FlexMoEError("no seeds to compare")
    return pairs


def _run_mean(clients: Mapping[int, np.ndarray]) -> float:
    return float(np.mean([delta.mean() for delta in clients.values()]))


def _resampled_runs(
    clients: Mapping[int, np.ndarray], draws: int, rng: np.random.Generator
) -> np.ndarray:
    """``draws`` means of a run's differences, each client's examples drawn again with
    replacement."""
    per_client = [
        delta[rng.integers(len(delta), size=(draws, len(delta)))].mean(axis=1)
        for delta in clients.values()
    ]
    return np.mean(per_client, axis=0)
