"""Synthetic results files and cell commands for the benchmark harness's tests."""

import json
import statistics
import sys
from pathlib import Path

from benchmarks.harness import runner
from benchmarks.harness.matrix import Cell
from benchmarks.harness.report import write_report
from flexmoe.results import (
    ClientResult,
    Knowledge,
    LayerRouting,
    RoundRecord,
    RoutingStatistics,
    RunResults,
    Traffic,
    to_plain,
    write_results,
    write_rounds,
)
from flexmoe.settings import Settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_results(method: str, seed: int, rouges: list[float], **settings) -> RunResults:
    """A run's results as ``flexmoe run`` makes them, with one client per ROUGE-L score."""
    config = Settings().updated({"method": method, "seed": seed, **settings})
    up = 1_000_000 if method == "fedavg-full" else 10_000
    clients = [
        ClientResult(
            client_id=i,
            categories=[f"task-{i}"],
            n_train=10,
            n_test=4,
            rouge_l=score,
            test_loss=1.0,
            bytes_up=up // len(rouges),
            bytes_down=up // len(rouges),
        )
        for i, score in enumerate(rouges)
    ]
    return RunResults(
        method=method,
        split=config.data.split,
        alpha=config.data.alpha,
        seed=seed,
        rounds=config.federation.rounds,
        clients=clients,
        mean_rouge_l=statistics.fmean(rouges),
        mean_test_loss=1.0,
        comm=Traffic(bytes_up=up, bytes_down=up),
        wall_s=12.3 + seed,  # differs between runs; must not change the report
        config=config.to_record(),
    )


def cell_results(cell: Cell, rouges: list[float]) -> RunResults:
    settings = dict(cell.overrides)
    return fake_results(settings.pop("method"), settings.pop("seed"), rouges, **settings)


def train_losses(*losses: float) -> list[RoundRecord]:
    """rounds.json records with these mean training losses, rounds from 1."""
    return [
        RoundRecord(
            round=r, lr=1e-3, mean_train_loss=loss, bytes_up=0, bytes_down=0, wall_s=1.0, clients=[]
        )
        for r, loss in enumerate(losses, start=1)
    ]


def write_run(folder: Path, results: RunResults, rounds: list[RoundRecord] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_results(folder, results)
    if rounds is not None:
        write_rounds(folder, rounds)
    return folder


SCORES = {  # method -> seed -> per-client ROUGE-L
    "flex": {0: [30.0, 40.0], 1: [32.0, 44.0], 2: [28.0, 39.0]},
    "fedavg": {0: [35.0, 41.0], 1: [36.0, 44.0], 2: [37.0, 45.0]},
    "fedavg-full": {0: [20.0, 22.0], 1: [21.0, 25.0], 2: [19.0, 20.0]},
}


def table_row(report: str, first: str, after: str = "") -> list[str]:
    """The cells of the first table row of ``report`` starting with ``first`` (after ``after``)."""
    for line in report[report.index(after) :].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in the report")


WRITE = (
    "import json, pathlib, sys, time; out = pathlib.Path(sys.argv[1]); "
    "run = out.parent / 'running'; "
    "run.mkdir(parents=True, exist_ok=True); (run / out.name).touch(); time.sleep(0.4); "
    "peak = len(list(run.iterdir())); print('peak', peak); time.sleep(0.2); "
    "(run / out.name).unlink(); out.mkdir(parents=True, exist_ok=True); "
    "sys.argv[3] == '0' and (out / 'results.json').write_text(sys.argv[2]); "
    "(out.parent / 'peaks').mkdir(exist_ok=True); "
    "(out.parent / 'peaks' / str(peak)).touch(); sys.exit(int(sys.argv[3]))"
)


def fake_command(failing: str = "") -> runner.CommandBuilder:
    """`python -c` writing a fake results.json, or exiting 3 for the method named ``failing``."""

    def build(cell: Cell, out: Path) -> list[str]:
        fails = cell.overrides["method"] == failing
        payload = json.dumps(to_plain(cell_results(cell, [10.0])))
        return [sys.executable, "-c", WRITE, str(out), payload, "3" if fails else "0"]

    return build


def routing_record(utilisation: list[float], gates: list[float]) -> RoutingStatistics:
    layer = LayerRouting(
        layer=0, num_experts=2, top_k=1, tokens=8, utilisation=utilisation, token_entropy=0.5,
        utilisation_entropy=0.6, max_entropy=0.7, gate_means=gates,
    )  # fmt: skip
    return RoutingStatistics(layers=[layer])


def sweep_results(method: str, setting: str, value: float, rouge: float) -> RunResults:
    return fake_results(method, 0, [rouge], eval_split="validation", **{setting: value})


def write_scores(folder: Path, per_client: dict[int, list[float]]) -> None:
    """``folder/predictions.jsonl`` as a finished cell keeps it: ROUGE-L of test examples
    ``p0``, ``p1``, ... of each client."""
    lines = [
        json.dumps({"client": client, "prompt_id": f"p{i}", "category": "qa", "rouge_l": score,
                    "prediction": "an answer"})
        for client, scores in per_client.items()
        for i, score in enumerate(scores)
    ]  # fmt: skip
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")


def claims(folder: Path, arms: dict, uplink: int = 2_000_000) -> list[str]:
    """The claim lines of the report on runs of ``arms``: method -> seed -> (each of two
    clients' per-example ROUGE-L, each client's held-out perplexity per domain, base 10)."""
    for method, seeds in arms.items():
        for seed, (rouges, ppls) in seeds.items():
            results = fake_results(method, seed, [statistics.fmean(r) for r in rouges])
            for client, ppl in zip(results.clients, ppls, strict=True):
                client.knowledge = Knowledge(
                    heldout_ppl=ppl, heldout_ppl_base=dict.fromkeys(ppl, 10.0)
                )
            if method == "fedavg-full":
                results.comm = Traffic(bytes_up=uplink, bytes_down=2_000_000)
            folder_of_run = write_run(folder / method / f"seed{seed}", results)
            write_scores(folder_of_run, dict(enumerate(rouges)))
    report = write_report(folder).read_text()
    return [line for line in report.splitlines() if line.startswith("- ")]
