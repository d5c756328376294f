"""Paired bootstrap comparisons, on synthetic per-example scores with a known difference."""

import numpy as np
import pytest

from benchmarks.harness.paired import holm, paired_difference
from flexmoe.errors import FlexMoEError


def scores(shift: float, seeds: int = 3, clients: int = 4, examples: int = 100, noise: int = 0):
    """Per-example ROUGE-L of a method ``shift`` points above a shared baseline: each example
    has its own difficulty, shared by every method (what pairing removes), plus noise of about
    26 points per example difference, as on Dolly."""
    rng = np.random.default_rng(1000 + noise)
    shared = np.random.default_rng(7)
    runs = {}
    for seed in range(seeds):
        runs[seed] = {}
        for client in range(clients):
            difficulty = shared.uniform(0, 60, examples)
            values = difficulty + shift + rng.normal(0, 18, examples)
            runs[seed][client] = {f"p{client}-{i}": float(v) for i, v in enumerate(values)}
    return runs


def test_intervals_cover_a_known_difference_and_find_it_and_rarely_find_one_that_is_not():
    repeats, covered, found, false = 20, 0, 0, 0
    for r in range(repeats):
        shifted = paired_difference(scores(6.0, noise=2 * r), scores(0.0, noise=2 * r + 1), 800)
        low, high = shifted.interval()
        covered += low < 6 < high
        found += low > 0
        null = paired_difference(scores(0.0, noise=100 + r), scores(0.0, noise=200 + r), 800)
        low, high = null.interval()
        false += not low < 0 < high
    assert covered >= 16 and found >= 18 and false <= 4  # nominal: 19, 20, 1
    assert (shifted.seeds, shifted.examples) == (3, 1200)
    assert 3 < shifted.mean < 9 and shifted.p_value < 0.01


def test_holm_corrects_across_the_comparisons_of_a_claim():
    baseline = scores(0.0, noise=10)
    differences = {
        "clear": paired_difference(scores(8.0, noise=11), baseline, draws=2000),
        "none": paired_difference(scores(0.0, noise=12), baseline, draws=2000),
        "worse": paired_difference(scores(-8.0, noise=13), baseline, draws=2000),
    }
    verdicts = holm(differences)
    assert verdicts["clear"].supported and verdicts["clear"].level == pytest.approx(1 - 0.05 / 3)
    assert verdicts["worse"].rejected and not verdicts["worse"].supported  # the other way
    assert not verdicts["none"].rejected
    # the adjusted interval of the strongest comparison is wider than its plain 95% one
    plain = differences["clear"].interval(0.95)
    assert verdicts["clear"].low <= plain[0] and verdicts["clear"].high >= plain[1]


def test_a_step_down_that_fails_once_rejects_nothing_after():
    baseline = scores(0.0, seeds=2, examples=20, noise=20)
    differences = {
        "weak": paired_difference(scores(1.0, seeds=2, examples=20, noise=21), baseline, 500),
        "strong": paired_difference(scores(30.0, seeds=2, examples=20, noise=22), baseline, 500),
    }
    verdicts = holm(differences)
    assert verdicts["strong"].supported and not verdicts["weak"].rejected


@pytest.mark.parametrize(
    ("second", "phrase"),
    [
        (scores(0.0, seeds=2), "seeds .* differ: not paired"),
        (scores(0.0, clients=3), "clients .* differ"),
        (scores(0.0, examples=99), "scored other test examples"),
    ],
)
def test_runs_on_other_examples_are_not_compared(second, phrase):
    with pytest.raises(FlexMoEError, match=phrase):
        paired_difference(scores(1.0), second, draws=10)
