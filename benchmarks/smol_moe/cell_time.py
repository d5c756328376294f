"""Where a benchmark cell's time goes: each finished cell's wall time and its clients' seconds by
phase, from its rounds.json and results.json.

    python benchmarks/smol_moe/cell_time.py [--out benchmarks/results/smol-moe-dolly]

Client seconds are summed over clients and rounds, so with clients in parallel processes they add
up to more than the wall time. Training phases: grafting (the first round's ``restore``, where a
FLEx client grafts; later rounds restore a saved state), ``compute`` (the local steps) and the
rest (loading the base, restoring and saving states, starting processes); evaluation phases:
``answer`` (greedy answers), ``test_loss`` (with the final model's routing, recorded by the same
forward), ``diagnostics`` (held-out perplexity, the base's routing and FLOPs; for a method that
trains base weights, loading the pristine base too) and the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexmoe.results import RESULTS_FILE, ROUNDS_FILE, read_results, read_rounds

OUT = Path(__file__).resolve().parents[1] / "results" / "smol-moe-dolly"
COLUMNS = ("wall", "graft", "train", "train other", "answer", "test loss", "diagnostics",
           "eval other")  # fmt: skip


def cell_phases(folder: Path) -> dict[str, float]:
    """A finished cell's wall time and its clients' seconds in each phase, in minutes."""
    rounds = read_rounds(folder / ROUNDS_FILE)
    results = read_results(folder / RESULTS_FILE)
    phases = dict.fromkeys(COLUMNS, 0.0)
    phases["wall"] = results.wall_s
    for record in rounds:
        for client in record.clients:
            seconds = dict(client.seconds)
            if record.round == 1:
                phases["graft"] += seconds.pop("restore", 0.0)
            phases["train"] += seconds.pop("compute", 0.0)
            phases["train other"] += sum(seconds.values())
    for client in results.clients:
        seconds = dict(client.eval_seconds)
        for phase in ("answer", "test_loss", "diagnostics"):
            phases[phase.replace("_", " ")] += seconds.pop(phase, 0.0)
        phases["eval other"] += sum(seconds.values())
    return {name: value / 60 for name, value in phases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    cells = sorted(
        p.parent for p in args.out.rglob(RESULTS_FILE) if (p.parent / ROUNDS_FILE).is_file()
    )
    print("minutes: the cell's wall time, then its clients' time by phase (summed over clients)")
    print(f"| cell | {' | '.join(COLUMNS)} |")
    print(f"| --- |{' ---: |' * len(COLUMNS)}")
    for folder in cells:
        phases = cell_phases(folder)
        values = " | ".join(f"{phases[c]:.1f}" for c in COLUMNS)
        print(f"| {folder.relative_to(args.out)} | {values} |")


if __name__ == "__main__":
    main()
