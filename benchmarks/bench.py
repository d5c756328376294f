"""``python -m benchmarks.bench``: run a benchmark matrix (methods x splits x seeds) and write
its report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness.matrix import DEFAULT_ROOT, MATRICES, SWEEP
from benchmarks.harness.tuning import MAX_WIDENINGS
from flexmoe.cli import entry, execute
from flexmoe.cli.options import MODEL_HELP, integers, names
from flexmoe.errors import FlexMoEError
from flexmoe.io import check_writable

BENCH_OVERRIDES = {  # settings one option sets for every cell
    "model": (str, "MODEL", MODEL_HELP),
    **{
        name: (int, "N", "for every cell")
        for name in (
            "rounds",
            "local_steps",
            "batch_size",
            "micro_batch_size",
            "max_train",
            "max_test",
            "max_length",
            "max_new_tokens",
            "eval_batch_size",
            "eval_every",
            "mmlu_per_topic",
            "selection_token_budget",
        )
    },
    "min_lr": (float, "LR", "for every cell"),
    "dtype": (str, "DTYPE", "for every cell: bfloat16 computes in mixed precision"),
}


def build_parser() -> argparse.ArgumentParser:
    bench = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Run every cell of a matrix as its own 'flexmoe run' process (up to --jobs "
        "at a time, each logged beside its folder), skip cells whose results.json exists, then "
        "write report.md and plots. Exits non-zero if any cell failed.",
    )
    bench.add_argument(
        "--matrix",
        default="default",
        choices=sorted([*MATRICES, SWEEP]),
        help="sweep: each method's learning rate (FedProx's mu, FedAdam's server rate) on "
        "validation data, written to OUT/sweep/tuned.json for --tuned",
    )
    bench.add_argument("--out", type=Path, default=DEFAULT_ROOT, help=f"default {DEFAULT_ROOT}")
    bench.add_argument("--jobs", type=int, help="parallel runs (default: half the CPU cores)")
    bench.add_argument("--methods", type=names, help="comma-separated, e.g. flex,fedavg")
    bench.add_argument("--seeds", type=integers, help="comma-separated, e.g. 0,1,2")
    bench.add_argument("--splits", type=names, help="groups to keep, e.g. pathological,dirichlet")
    for name, (kind, metavar, text) in BENCH_OVERRIDES.items():
        bench.add_argument(f"--{name.replace('_', '-')}", type=kind, metavar=metavar, help=text)
    bench.add_argument(
        "--tuned",
        type=Path,
        metavar="TUNED.json",
        help="each method's settings chosen by a sweep (its tuned.json)",
    )
    bench.add_argument(
        "--max-widenings",
        type=int,
        default=MAX_WIDENINGS,
        choices=range(MAX_WIDENINGS + 1),
        metavar="N",
        help="sweep: half-decades a grid may grow by while its best value is at an end "
        f"(default {MAX_WIDENINGS}; 0 keeps each grid as it is, the first cut when time is short)",
    )
    bench.add_argument("--list", action="store_true", help="print the cells and run nothing")
    bench.set_defaults(command=run_bench, loads_models=False, command_parser=bench)
    return bench


def main(argv: Sequence[str] | None = None) -> int:
    return execute(build_parser(), argv)


def run_bench(args: argparse.Namespace) -> None:
    """Run a benchmark matrix (or the sweep, stage by stage), then write its report; fail if
    any cell failed."""
    from benchmarks.harness.matrix import select
    from benchmarks.harness.tuning import read_tuning

    check_writable(args.out)
    overrides = {n: getattr(args, n) for n in BENCH_OVERRIDES if getattr(args, n) is not None}
    if args.matrix == SWEEP:
        if args.tuned or args.seeds or args.splits:
            raise FlexMoEError("the sweep runs seed 0 on the pathological split and tunes itself")
        _run_sweep(args, overrides)
        return
    tuned = read_tuning(args.tuned) if args.tuned else None
    matrix = select(MATRICES[args.matrix], args.methods, args.seeds, args.splits, overrides, tuned)
    cells, root = matrix.cells(), args.out / matrix.name
    if args.list:
        _list(cells)
        return
    print(f"bench: matrix {matrix.name}, {len(cells)} cells -> {root}")
    _finish(root, cells, _run(root, cells, args.jobs))


def _run_sweep(args: argparse.Namespace, overrides: dict) -> None:
    """Each stage of the sweep on the choices of the stages before it; tuned.json after each."""
    from benchmarks.harness.matrix import SWEEP_STAGE_COUNT, sweep_cells
    from benchmarks.harness.tuning import tuning_of, write_tuning

    root, outcomes, everything = args.out / SWEEP, [], {}
    for stage in range(SWEEP_STAGE_COUNT):
        if args.list:
            if stage == 0:
                _list(
                    sweep_cells(stage, tuning_of(root), overrides, args.methods, args.max_widenings)
                )
            else:
                print(f"(stage {stage + 1} starts from the choices of stage {stage})")
            continue
        while True:  # again while a choice at the edge of its grid widens the grid
            cells = sweep_cells(stage, tuning_of(root), overrides, args.methods, args.max_widenings)
            fresh = [cell for cell in cells if cell.name not in everything]
            if not fresh:
                break
            everything.update({cell.name: cell for cell in fresh})
            print(f"bench: sweep stage {stage + 1}, {len(fresh)} cells -> {root}")
            outcomes += _run(root, fresh, args.jobs)
            print(f"choices written to {write_tuning(root, tuning_of(root))}")
    if not args.list:
        _finish(root, list(everything.values()), outcomes)


def _list(cells) -> None:
    for cell in cells:
        print(f"{cell.name}  {' '.join(cell.arguments())}")


def _run(root: Path, cells, jobs: int | None):
    from benchmarks.harness.runner import run_cells
    from flexmoe.federated.reaper import reaped
    from flexmoe.models.loading import resolve_model_path

    for model in sorted({cell.config().model for cell in cells}):
        resolve_model_path(model)  # build a named model once here, not in every cell at once
    with reaped():  # a killed bench takes its running cells with it (they resume next time)
        return run_cells(root, cells, jobs)


def _finish(root: Path, cells, outcomes) -> None:
    """Write the report of what finished under ``root``; fail if any cell failed."""
    from benchmarks.harness.report import write_report
    from benchmarks.harness.runner import describe, failures
    from flexmoe.results import RESULTS_FILE

    failed = failures(outcomes)
    if any(root.rglob(RESULTS_FILE)):
        print(f"report written to {write_report(root)}")
    if failed:
        lines = "\n".join(describe(outcome) for outcome in failed)
        raise FlexMoEError(f"{len(failed)} of {len(cells)} cells failed:\n{lines}")


if __name__ == "__main__":
    entry(main())
