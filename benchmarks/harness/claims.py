"""The paper's claims for each FLEx arm of a setting, weighed by paired comparisons.

Every comparison pairs two arms on what both measured on the same things in the same seeds: each
test example's ROUGE-L, or each held-out domain's perplexity increase of a client's model. Its
interval is a hierarchical bootstrap (``benchmarks.harness.paired``), and Holm's step-down runs
across the comparisons of one family (one FLEx arm against the other arms, by one measure; the
paper's FLEx against its variants is a family of its own), so that a claim resting on several
comparisons is judged at the family's level.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from benchmarks.harness.paired import Scores, Verdict, holm, paired_difference
from benchmarks.harness.summary import Run, Summary
from flexmoe.errors import FlexMoEError
from flexmoe.methods import METHODS

FLEX = "flex"
REFERENCE = "fedavg-full"  # traffic is compared with naive dense FL
LEVEL = 0.95


@dataclass(frozen=True)
class Measure:
    """What a comparison pairs: per (seed, client, item) values of a run, and which way is
    better."""

    name: str
    item: str  # what a value is measured on
    per_run: Callable[[Run], Mapping[int, Mapping[str, float]]]
    higher_is_better: bool


def rouge_of(run: Run) -> Mapping[int, Mapping[str, float]]:
    """ROUGE-L x 100 of every test example, by client and prompt id."""
    return run.scores


def ppl_increase_of(run: Run) -> Mapping[int, Mapping[str, float]]:
    """The relative increase of held-out perplexity over the base model, in per cent, by
    client and pretraining domain."""
    return {
        client.client_id: {
            domain: 100 * (ppl / client.knowledge.heldout_ppl_base[domain] - 1)
            for domain, ppl in client.knowledge.heldout_ppl.items()
        }
        for client in run.results.clients
        if client.knowledge is not None
    }


ROUGE = Measure("ROUGE-L", "test example", rouge_of, higher_is_better=True)
KNOWLEDGE = Measure("held-out perplexity increase", "held-out domain", ppl_increase_of, False)


@dataclass(frozen=True)
class Comparison:
    """One arm against a rival: the verdict at the family's Holm level, or why there is none."""

    rival: str
    verdict: Verdict | None
    problem: str = ""  # why the two could not be paired

    def favours(self, higher_is_better: bool) -> bool | None:
        """True when the arm is better with zero excluded after Holm, False when worse, None
        when no difference is shown."""
        if self.verdict is None or not self.verdict.rejected:
            return None
        return (self.verdict.low > 0) == higher_is_better


def compare(
    arm: str, rivals: list[str], summaries: Mapping[str, Summary], measure: Measure
) -> dict[str, Comparison]:
    """``arm`` minus each rival by ``measure``, paired over their common seeds, with Holm's
    correction across the comparisons that could be paired."""
    differences, problems = {}, {}
    mine = scores(summaries[arm], measure)
    for rival in rivals:
        theirs = scores(summaries[rival], measure)
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            problems[rival] = f"no seed where both kept each {measure.item}'s {measure.name}"
            continue
        try:
            differences[rival] = paired_difference(
                {s: mine[s] for s in seeds}, {s: theirs[s] for s in seeds}
            )
        except FlexMoEError as error:
            problems[rival] = str(error)
    verdicts = holm(differences, LEVEL) if differences else {}
    return {
        rival: Comparison(rival, verdicts.get(rival), problems.get(rival, "")) for rival in rivals
    }


def scores(summary: Summary, measure: Measure) -> Scores:
    """A summary's per-run values by seed (the first run of a repeated seed), runs that kept
    none left out."""
    kept: dict[int, Mapping[int, Mapping[str, float]]] = {}
    for run in summary.runs:
        values = measure.per_run(run)
        seed = run.config.get("seed", 0)
        if values and seed not in kept:
            kept[seed] = values
    return kept


def flex_arms(summaries: Mapping[str, Summary]) -> list[str]:
    """The arms that run FLEx itself (the paper's, and its variants), not its ablations."""
    return [name for name, summary in summaries.items() if summary.method == FLEX]


def personalises(method: str) -> bool:
    known = METHODS.get(method)
    return known is not None and known.personalises


def federated_baseline(method: str) -> bool:
    """A federated method that grafts nothing: the paper's baselines."""
    known = METHODS.get(method)
    return known is not None and known.federated and not known.grafts
