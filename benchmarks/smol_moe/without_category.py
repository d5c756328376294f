"""Mean ROUGE-L of every setting and method with the clients of one category left out.

    python benchmarks/smol_moe/without_category.py [--category classification] [FOLDER ...]

The "without classification" columns of docs/results.md: on the pathological split one client
holds the classification category, whose few yes/no test answers swing a run's four-client mean
by up to 18.75 points. A run's score here is its mean over the other clients; the table gives the
mean and sample standard deviation over seeds, per setting (the report's grouping) and method.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable
from pathlib import Path

from benchmarks.harness.summary import Run, group_runs, load_runs, method_order, setting_labels

RESULTS = Path(__file__).resolve().parents[1] / "results" / "smol-moe"


def without(runs: Iterable[Run], category: str) -> list[float] | None:
    """Each run's mean ROUGE-L over its clients that do not hold ``category`` (None when a run
    has no such client, as on a Dirichlet split where every client holds some of it)."""
    scores = []
    for run in runs:
        kept = [c.rouge_l for c in run.results.clients if category not in c.categories]
        if not kept:
            return None
        scores.append(statistics.fmean(kept))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--category", default="classification")
    args = parser.parse_args()
    for folder in args.folders or [RESULTS / "default", RESULTS / "ablations"]:
        groups = group_runs(load_runs(folder))
        labels = setting_labels(groups)
        for setting, methods in groups.items():
            print(f"{folder.name}: {labels[setting]}, without {args.category}")
            for name in method_order(methods):
                scores = without(methods[name].runs, args.category)
                if scores is None:
                    print(f"  {name:<14} every client of some run holds {args.category}")
                    continue
                spread = f"{statistics.stdev(scores):5.2f}" if len(scores) > 1 else "    -"
                each = " / ".join(f"{s:.2f}" for s in scores)
                print(f"  {name:<14} {statistics.fmean(scores):6.2f} {spread}   ({each})")


if __name__ == "__main__":
    main()
