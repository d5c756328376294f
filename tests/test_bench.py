"""Benchmark matrices, the parallel cell runner and report.md, on synthetic results files."""

import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from flexmoe.benchmark import runner
from flexmoe.benchmark.matrix import MATRICES, Cell, select, sweep_cells
from flexmoe.benchmark.plots import loss_curve, mean_curve, rouge_curve
from flexmoe.benchmark.report import REPORT_FILE, write_report
from flexmoe.benchmark.runner import describe, failures, run_cells
from flexmoe.benchmark.summary import Run, load_runs, write_samples
from flexmoe.benchmark.tuning import (
    Tuning,
    at_edge,
    choose,
    read_tuning,
    swept_values,
    tuning_of,
    write_tuning,
)
from flexmoe.cli import main
from flexmoe.errors import FlexMoEError
from flexmoe.methods import METHODS
from flexmoe.results import (
    Checkpoint,
    ClientResult,
    Knowledge,
    LayerRouting,
    MMLUScore,
    RougePoint,
    RoundRecord,
    Routing,
    RoutingStatistics,
    RunResults,
    Traffic,
    to_plain,
    write_checkpoint,
    write_results,
    write_rounds,
)
from flexmoe.runconfig import RunConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_results(method: str, seed: int, rouges: list[float], **settings) -> RunResults:
    """A run's results as ``flexmoe run`` makes them, with one client per ROUGE-L score."""
    config = RunConfig().updated({"method": method, "seed": seed, **settings})
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
        split=config.split,
        alpha=config.alpha,
        seed=seed,
        rounds=config.rounds,
        clients=clients,
        mean_rouge_l=statistics.fmean(rouges),
        mean_test_loss=1.0,
        comm=Traffic(bytes_up=up, bytes_down=up),
        wall_s=12.3 + seed,  # differs between runs; must not change the report
        config=asdict(config),
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


@pytest.fixture
def bench_dir(tmp_path) -> Path:
    """Three methods x three seeds on the pathological split, flex with knowledge results."""
    for method, seeds in SCORES.items():
        for seed, rouges in seeds.items():
            results = fake_results(method, seed, rouges, split="pathological", clients=2)
            if method == "flex":
                results.mean_ppl_increase = 0.01 * (seed + 1)
            losses = train_losses(3.0, 1.5, 1.0)
            write_run(tmp_path / "pathological" / method / f"seed{seed}", results, losses)
    return tmp_path


def table_row(report: str, first: str, after: str = "") -> list[str]:
    """The cells of the first table row of ``report`` starting with ``first`` (after ``after``)."""
    for line in report[report.index(after) :].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in the report")


def test_report_means_and_standard_deviations_over_seeds(bench_dir):
    report = write_report(bench_dir).read_text()
    for method, seeds in SCORES.items():
        means = [statistics.fmean(r) for r in seeds.values()]
        row = table_row(report, method)
        assert row[1:4] == ["3", f"{statistics.fmean(means):.2f}", f"{statistics.stdev(means):.2f}"]
    assert table_row(report, "flex")[4] == "+2.00%"  # mean of 1%, 2%, 3%
    assert table_row(report, "fedavg")[4] == "-"
    # MB up, down, traffic ratio, the method's own hyperparameters
    assert table_row(report, "flex")[5:] == ["0.010", "0.010", "0.01", "lr 0.001"]
    assert table_row(report, "fedavg-full")[7] == "1"
    client_1 = table_row(report, "1")
    assert client_1[:2] == ["1", "task-1"]
    assert client_1[2:] == [
        f"{statistics.fmean(s[1] for s in SCORES[m].values()):.2f}" for m in SCORES
    ]
    assert "Best mean ROUGE-L on pathological: fedavg (39.67)." in report
    assert "FLEx (flex) does not have the best mean ROUGE-L here: 35.50, rank 2 of 3" in report


def test_report_is_byte_identical_when_rerun_and_links_existing_plots(bench_dir):
    first = write_report(bench_dir).read_bytes()
    assert write_report(bench_dir).read_bytes() == first
    links = [
        line.split("](")[1].rstrip(")") for line in first.decode().splitlines() if "![" in line
    ]
    assert len(links) == 3
    for link in links:
        assert (bench_dir / link).read_bytes().startswith(PNG_MAGIC)
    assert len(load_runs(bench_dir)) == 9  # report.md and the plots are not read as runs


def test_report_works_without_optional_fields_and_says_when_flex_is_best(tmp_path):
    write_run(tmp_path / "a", fake_results("flex", 0, [50.0], split="dirichlet", alpha=0.5))
    write_run(tmp_path / "b", fake_results("local", 0, [10.0], split="dirichlet", alpha=0.5))
    report = write_report(tmp_path).read_text()
    assert "## dirichlet-0.5" in report
    assert table_row(report, "flex")[1:5] == ["1", "50.00", "-", "-"]
    assert table_row(report, "flex")[7] == "-"  # no fedavg-full to compare traffic with
    assert "FLEx (flex) has the best mean ROUGE-L here." in report
    assert "## Ablations" not in report


def test_report_warns_of_several_runs_of_one_seed(tmp_path):
    for folder in ("a", "b"):
        write_run(tmp_path / folder, fake_results("fedavg", 4, [10.0]))
    report = write_report(tmp_path).read_text()
    assert "Warning: fedavg has several runs of seed [4] (a, b)." in report
    assert table_row(report, "fedavg")[1:4] == ["2", "10.00", "0.00"]


def test_settings_that_differ_in_one_ablated_field_form_an_ablation(tmp_path):
    for r, score in ((1, 30.0), (2, 34.0), (3, 33.0)):
        for seed in (0, 1):
            results = fake_results("flex", seed, [score + seed], experts_per_layer=r)
            results.flops_ratio = 1 + 0.25 * r
            write_run(tmp_path / f"experts-per-layer-{r}" / "flex" / f"seed{seed}", results)
    report = write_report(tmp_path).read_text()
    assert "## pathological, experts-per-layer 2" in report
    assert "### experts-per-layer (pathological)" in report
    assert table_row(report, "2") == ["2", "flex", "2", "34.50", "0.71", "-", "1.500", "0.010"]
    assert (tmp_path / "plots" / "ablation-experts-per-layer-pathological.png").is_file()


def test_curves_prefer_rouge_per_round_and_average_over_seeds():
    results = fake_results("flex", 0, [1.0])
    run = Run("x", results, train_losses(2.0))
    assert rouge_curve(run) == [] and loss_curve(run) == [(1, 2.0)]
    results.rouge_per_round = [RougePoint(round=1, mean_rouge_l=5.0)]
    assert rouge_curve(Run("x", results, None)) == [(1, 5.0)]
    assert mean_curve([[(1, 1.0), (2, 3.0)], [(1, 3.0)]]) == [(1, 2.0), (2, 3.0)]


def test_report_of_a_folder_without_valid_results_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text('{"method": "flex"}')
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a flexmoe results file" in capsys.readouterr().err


# --- matrices ---


def test_default_matrix_covers_every_method_split_and_seed():
    cells = MATRICES["default"].cells()
    assert len(cells) == len(METHODS) * 3 * 3
    assert len({c.name for c in cells}) == len(cells)
    by_name = {c.name: c for c in cells}
    config = by_name["dirichlet-0.5/flex-generic/seed2"].config()
    assert (config.split, config.alpha, config.clients, config.seed) == ("dirichlet", 0.5, 10, 2)
    assert by_name["pathological/fedavg-full/seed0"].config().clients == 4


def test_smoke_matrix_is_small_and_ablations_run_each_setting_once():
    smoke = MATRICES["smoke"].cells()
    assert [c.name for c in smoke[:3]] == [f"pathological/flex/seed{s}" for s in (0, 1, 2)]
    assert {c.overrides["method"] for c in smoke} == {"flex", "fedavg", "fedavg-full"}
    assert all(c.config().rounds <= 2 and c.config().max_train <= 16 for c in smoke)
    names = [c.name for c in MATRICES["ablations"].cells()]
    assert "experts-per-layer-3/flex/seed1" in names and "clients-20/flex/seed0" in names
    assert "size-ratio-0.25/flex/seed2" in names
    assert not any(n.startswith("size-ratio-1.0/") for n in names)  # same as experts-per-layer-1
    config = {c.name: c.config() for c in MATRICES["ablations"].cells()}
    assert config["clients-20/flex/seed0"].clients == 20
    assert config["clients-20/flex/seed0"].split == "dirichlet"


def test_select_narrows_a_matrix_and_applies_shared_settings():
    matrix = select(MATRICES["default"], ["flex", "fedavg"], [7], ["dirichlet"], {"rounds": 3})
    names = [c.name for c in matrix.cells()]
    assert names == [f"dirichlet-{a}/{m}/seed7" for a in ("1.0", "0.5") for m in ("flex", "fedavg")]
    assert all(c.config().rounds == 3 for c in matrix.cells())
    assert Cell("x", {"rounds": 3, "method": "flex"}).arguments() == [
        "--method", "flex", "--rounds", "3"
    ]  # fmt: skip
    with pytest.raises(FlexMoEError, match="unknown method"):
        select(MATRICES["smoke"], ["nope"])
    with pytest.raises(FlexMoEError, match="no group"):
        select(MATRICES["smoke"], groups=["dirichlet"])
    with pytest.raises(FlexMoEError, match="local-steps must be at least 1"):
        select(MATRICES["smoke"], overrides={"local_steps": 0})


# --- running cells ---

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


def test_cells_run_in_parallel_and_a_failure_does_not_stop_the_others(tmp_path):
    cells = select(MATRICES["smoke"], ["flex", "fedavg"], [0, 1]).cells()
    lines: list[str] = []
    outcomes = run_cells(tmp_path, cells, jobs=2, command=fake_command("fedavg"), echo=lines.append)
    assert [o.cell.name for o in outcomes] == [c.name for c in cells]
    assert [o.status for o in outcomes] == ["done", "done", "failed", "failed"]
    assert (tmp_path / "pathological" / "flex" / "seed1" / "results.json").is_file()
    log = tmp_path / "pathological" / "fedavg" / "seed0.log"
    assert "peak" in log.read_text()
    assert {o.log for o in failures(outcomes)} == {log, log.with_name("seed1.log")}
    assert f"pathological/fedavg/seed0  exit status 3; log: {log}" in describe(outcomes[2])
    assert len(lines) == 4
    assert (tmp_path / "pathological" / "flex" / "peaks" / "2").exists()  # two ran at once


def test_finished_cells_are_skipped_and_stale_ones_refused(tmp_path):
    cells = select(MATRICES["smoke"], ["flex"], [0, 1, 2]).cells()
    write_run(tmp_path / cells[0].name, cell_results(cells[0], [99.0]))
    write_run(tmp_path / cells[1].name, fake_results("flex", 1, [99.0], rounds=7))
    outcomes = run_cells(tmp_path, cells, jobs=1, command=fake_command(), echo=lambda _: None)
    assert [o.status for o in outcomes] == ["skipped", "failed", "done"]
    assert "rounds 7 != 2" in outcomes[1].reason
    kept = json.loads((tmp_path / cells[0].name / "results.json").read_text())
    assert kept["mean_rouge_l"] == 99.0
    assert not (tmp_path / "pathological" / "flex" / "seed0.log").exists()


def test_bench_command_reports_failed_cells_writes_the_report_and_exits_nonzero(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(runner, "flexmoe_command", fake_command("fedavg"))
    argv = ["bench", "--matrix", "smoke", "--seeds", "0,1", "--out", str(tmp_path), "--jobs", "2"]
    assert main([*argv, "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 of 6 cells failed" in err
    assert str(tmp_path / "smoke" / "pathological" / "fedavg" / "seed1.log") in err
    report = (tmp_path / "smoke" / REPORT_FILE).read_text()
    assert table_row(report, "flex")[1] == "2" and "fedavg |" not in report
    assert main([*argv, "--rounds", "1", "--methods", "flex,fedavg-full"]) == 0  # all finished
    assert main(["bench", "--matrix", "smoke", "--list", "--seeds", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("pathological/fedavg-full/seed0")


def test_run_summary_table_states_traffic_in_megabytes():
    from flexmoe.cli.run import results_table

    table = results_table(fake_results("fedavg-full", 0, [10.0, 30.0]))
    assert table.splitlines()[-1].startswith(
        "mean ROUGE-L 20.00   uplink 1.00 MB   downlink 1.00 MB"
    )
    assert "task-1" in table


def routing_record(utilisation: list[float], gates: list[float]) -> RoutingStatistics:
    layer = LayerRouting(
        layer=0, num_experts=2, top_k=1, tokens=8, utilisation=utilisation, token_entropy=0.5,
        utilisation_entropy=0.6, max_entropy=0.7, gate_means=gates,
    )  # fmt: skip
    return RoutingStatistics(layers=[layer])


def test_report_tabulates_held_out_perplexity_routing_and_flops(tmp_path):
    for seed, (ppl, final_use) in enumerate([(12.0, [0.7, 0.3]), (16.0, [0.3, 0.7])]):
        results = fake_results("flex", seed, [30.0], split="pathological", clients=1)
        results.flops_ratio = 1.25
        client = results.clients[0]
        client.knowledge = Knowledge(
            heldout_ppl={"prose": ppl, "code": 2 * ppl},
            heldout_ppl_base={"prose": 10.0, "code": 20.0},
        )
        client.routing = Routing(
            base=routing_record([0.5, 0.5], []),
            final=routing_record(final_use, [0.2 + 0.4 * seed]),
        )
        client.grafted_experts = {"0": [6], "1": [4] if seed else [1, 2]}
        write_run(tmp_path / "flex" / f"seed{seed}", results)
    write_run(tmp_path / "local", fake_results("local", 0, [10.0], split="pathological", clients=1))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "from-an-older-report.png").write_bytes(PNG_MAGIC)
    report = write_report(tmp_path).read_text()
    assert table_row(report, "prose") == ["prose", "10.00", "14.00"]  # local measured none
    assert table_row(report, "code") == ["code", "20.00", "28.00"]
    # TV distance 0.2 in both seeds, entropies unchanged, gates 0.2 and 0.6, FLOPs 1.25
    assert table_row(report, "flex", after="Routing on") == [
        "flex",
        "0.200",
        "0.600 -> 0.600",
        "0.500 -> 0.500",
        "0.400",
        "1.250",
    ]
    assert table_row(report, "0", after="per MoE layer") == ["0", "0.200"]
    assert table_row(report, "flex", after="Grafted experts") == [
        "flex",
        "1 of 2",
        "0: [6]; 1: [1, 2]",
    ]
    assert not (tmp_path / "plots" / "from-an-older-report.png").exists()


def test_results_are_strict_json(tmp_path):
    results = fake_results("flex", 0, [10.0])
    results.mean_ppl_increase = float("nan")
    with pytest.raises(FlexMoEError, match="non-finite number; not written"):
        write_results(tmp_path, results)
    assert not list(tmp_path.iterdir())


def test_an_interrupted_cell_is_resumed_with_its_own_settings(tmp_path):
    from flexmoe.benchmark.runner import flexmoe_command

    cell = select(MATRICES["smoke"], ["flex"], [0]).cells()[0]
    assert flexmoe_command(cell, tmp_path)[3:6] == ["run", "--out", str(tmp_path)]
    write_checkpoint(tmp_path, Checkpoint(run_id="r", config=asdict(cell.config())))
    command = flexmoe_command(cell, tmp_path)
    assert command[3:6] == ["run", "--resume", str(tmp_path)]
    assert command[6:] == [*cell.arguments(), "--reply-timeout=0.0"]  # not the saved wait


def test_an_interrupted_cell_with_other_settings_is_not_resumed(tmp_path):
    cell = select(MATRICES["smoke"], ["flex"], [0]).cells()[0]
    other = cell.config().updated({"rounds": cell.config().rounds + 1})
    write_checkpoint(tmp_path / cell.name, Checkpoint(run_id="r", config=asdict(other)))
    [outcome] = run_cells(tmp_path, [cell], jobs=1, command=fake_command(), echo=lambda _: None)
    assert outcome.status == "failed" and "rounds 3 -> 2" in outcome.reason


def test_an_interrupted_cell_whose_server_waited_otherwise_is_resumed(tmp_path):
    cell = select(MATRICES["smoke"], ["flex"], [0]).cells()[0]
    waited = cell.config().updated({"reply-timeout": 3600.0})
    write_checkpoint(tmp_path / cell.name, Checkpoint(run_id="r", config=asdict(waited)))
    runner.log_path(tmp_path, cell).write_text("round 1 of the first attempt\n")
    [outcome] = run_cells(tmp_path, [cell], jobs=1, command=fake_command(), echo=lambda _: None)
    assert outcome.status == "done"
    first, resumed = outcome.log.read_text().split(f"--- flexmoe bench: resuming {cell.name} ---")
    assert "first attempt" in first and "peak" in resumed  # the earlier log is kept


def test_a_cell_that_fails_on_resuming_says_how_to_run_it_from_the_start(tmp_path):
    cell = select(MATRICES["smoke"], ["fedavg"], [0]).cells()[0]
    write_checkpoint(tmp_path / cell.name, Checkpoint(run_id="r", config=asdict(cell.config())))
    [outcome] = run_cells(tmp_path, [cell], jobs=1, command=fake_command("fedavg"), echo=print)
    assert outcome.reason == (
        f"exit status 3 on resuming it (to run it from the start, delete {tmp_path / cell.name})"
    )


def test_bench_runs_every_cell_on_the_model_it_is_given(capsys):
    assert main(["bench", "--matrix", "smoke", "--list", "--model", "smol-moe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("--model smol-moe" in line for line in lines)


def sweep_results(method: str, setting: str, value: float, rouge: float) -> RunResults:
    return fake_results(method, 0, [rouge], eval_split="validation", **{setting: value})


def test_the_sweep_chooses_on_validation_runs_and_methods_inherit_what_they_train_as(tmp_path):
    scores = {("flex", 3e-4): 20.0, ("flex", 1e-3): 31.0, ("flex", 3e-3): 31.0,
              ("fedavg", 3e-4): 25.0, ("fedavg", 1e-3): 12.0}  # fmt: skip
    for (method, lr), rouge in scores.items():
        folder = tmp_path / method / f"lr-{lr:g}" / "seed0"
        write_run(folder, sweep_results(method, "lr", lr, rouge))
    write_run(tmp_path / "test-split" / "seed0", fake_results("flex", 0, [99.0], lr=3e-4))
    tuning = tuning_of(tmp_path)
    assert tuning.choices["flex"].chosen == 1e-3  # a tie goes to the value swept first
    assert tuning.choices["flex"].scores == {"0.0003": 20.0, "0.001": 31.0, "0.003": 31.0}
    assert tuning.settings_for("flex-random") == {"lr": 1e-3}
    assert tuning.settings_for("fedyogi") == {"lr": 3e-4}
    assert tuning.settings_for("fedsa-lora") == {}  # not swept yet: its default
    stage_two = sweep_cells(1, tuning, {"rounds": 2})
    assert {c.overrides["method"] for c in stage_two} == {"fedprox", "fedadam"}
    assert all(c.overrides["lr"] == 3e-4 for c in stage_two)
    assert all(c.config().eval_split == "validation" for c in stage_two)
    assert "fedprox/proximal-mu-0.1/seed0" in [c.name for c in stage_two]
    with pytest.raises(FlexMoEError, match="needs the learning rate chosen for fedavg"):
        sweep_cells(1, Tuning({}), {})

    written = write_tuning(tmp_path, tuning)
    assert read_tuning(written) == tuning
    tuned = select(MATRICES["default"], ["flex", "fedprox"], [0], ["pathological"], tuned=tuning)
    assert [c.overrides.get("lr") for c in tuned.cells()] == [1e-3, 3e-4]
    written.write_text('{"flex": {"setting": "proximal-mu", "scores": {}, "chosen": 1}}')
    with pytest.raises(FlexMoEError, match="flex was not swept over 'proximal-mu'"):
        read_tuning(written)


def test_the_sweep_command_runs_its_stages_in_order_and_writes_its_choices(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(runner, "flexmoe_command", fake_command())
    argv = ["bench", "--matrix", "sweep", "--out", str(tmp_path), "--rounds", "1"]
    assert main([*argv, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "flex/lr-0.001/seed0" in listed and "--eval-split validation" in listed
    assert "stage 2 starts from the choices of stage 1" in listed
    assert main([*argv, "--methods", "fedavg,fedprox"]) == 0
    tuned = read_tuning(tmp_path / "sweep" / "tuned.json")
    assert set(tuned.choices) == {"fedavg", "fedprox"}
    assert (tmp_path / "sweep" / "fedprox" / "proximal-mu-1" / "seed0" / "results.json").is_file()
    assert main([*argv, "--seeds", "1"]) == 2
    assert "the sweep runs seed 0" in capsys.readouterr().err


def test_report_shows_mmlu_selection_agreement_predictions_margins_and_the_sweep(tmp_path):
    for seed in (0, 1):
        results = fake_results("flex", seed, [30.0 + seed, 40.0], split="pathological", clients=2)
        for client, plan in zip(results.clients, ([1] * 10, [1] * 5 + [2] * 5), strict=True):
            client.grafted_experts = {str(layer): [e] for layer, e in enumerate(plan)}
            client.knowledge = Knowledge(
                heldout_ppl={"prose": 11.0}, heldout_ppl_base={"prose": 10.0},
                mmlu=MMLUScore(questions=40, accuracy=0.25, macro_accuracy=0.25,
                               correct_probability=0.26 + 0.01 * seed),
                mmlu_base=MMLUScore(questions=40, accuracy=0.2, macro_accuracy=0.2,
                                    correct_probability=0.25),
            )  # fmt: skip
        folder = write_run(tmp_path / "flex" / f"seed{seed}", results)
        kept = folder / "clients" / "0123" / "client-1" / "predictions"
        kept.mkdir(parents=True)
        rows = [{"prompt_id": "ab", "category": "qa", "instruction": "Name it.", "input": "",
                 "reference": "Paris", "prediction": "Paris |\nit is " + "x" * 300,
                 "rouge_l": 50.0}] * 3  # fmt: skip
        (kept / f"round-{results.rounds:04d}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
        samples = json.loads(write_samples(folder).read_text())
        assert list(samples) == ["1"] and len(samples["1"]) == 2  # what the bench keeps
        assert set(samples["1"][0]) == {"prompt_id", "category", "prediction", "rouge_l"}
        assert len(samples["1"][0]["prediction"]) == 200
    write_run(
        tmp_path / "fedavg", fake_results("fedavg", 0, [20.0], split="pathological", clients=2)
    )
    for lr, rouge in ((3e-4, 12.0), (1e-3, 14.0)):
        write_run(tmp_path / "sweep" / f"lr-{lr:g}", sweep_results("fedavg", "lr", lr, rouge))
    report = write_report(tmp_path).read_text()
    assert (
        "Margin over fedavg: +15.25 (at least one of the two measured on a single run: no" in report
    )
    assert table_row(report, "flex", after="MMLU 0-shot") == [
        "flex", "4", "40", "20.00", "25.00", "0.2500", "0.2650", "+0.0150",
    ]  # fmt: skip
    # half of the 10 layers differ between the two clients of each run
    assert table_row(report, "flex", after="choose differently") == ["flex", "1.50", "50.0%"]
    assert "| flex | 1 | qa | ab | Paris \\| it is xxxx" in report  # one line, cut
    assert "x... | 50.0 |" in report
    assert report.count("| flex | 1 | qa |") == 2  # the first two of each client, seed 0
    assert table_row(report, "fedavg", after="Hyperparameter sweep") == [
        "fedavg", "lr", "0.0003", "12.00", "",
    ]  # fmt: skip
    assert "| fedavg | lr | 0.001 | 14.00 | chosen, at the edge of the sweep |" in report
    assert "## eval-split" not in report  # the sweep runs are not a setting of their own


def claims(folder: Path, scores: dict, uplink: int = 2_000_000) -> list[str]:
    """The claim lines of the report on runs of ``scores``: method -> (per-seed mean ROUGE-L,
    per-seed held-out perplexity increase); seed 0 of flex and fedavg also scored MMLU, flex
    losing 0.01 of p(right letter) and fedavg 0.03."""
    for method, (rouges, increases) in scores.items():
        for seed, (rouge, increase) in enumerate(zip(rouges, increases, strict=True)):
            results = fake_results(method, seed, [rouge])
            results.mean_ppl_increase = increase
            if method == "fedavg-full":
                results.comm = Traffic(bytes_up=uplink, bytes_down=2_000_000)
            if seed == 0 and method in ("flex", "fedavg"):
                lost = 0.01 if method == "flex" else 0.03
                results.clients[0].knowledge = Knowledge(
                    heldout_ppl={}, heldout_ppl_base={},
                    mmlu=MMLUScore(questions=40, accuracy=0.25, macro_accuracy=0.25,
                                   correct_probability=0.30 - lost),
                    mmlu_base=MMLUScore(questions=40, accuracy=0.25, macro_accuracy=0.25,
                                        correct_probability=0.30),
                )  # fmt: skip
            write_run(folder / method / f"seed{seed}", results)
    report = write_report(folder).read_text()
    return [line for line in report.splitlines() if line.startswith("- ")]


def test_report_weighs_the_papers_three_claims_against_the_seed_spread(tmp_path):
    lines = claims(
        tmp_path,
        {
            "flex": ([40.0, 42.0, 44.0], [0.01, 0.02, 0.03]),
            "flex-random": ([50.0, 50.5, 51.0], [0.015] * 3),  # grafts: not a federated baseline
            "fedavg": ([35.0, 36.0, 37.0], [0.05, 0.06, 0.07]),
            "fedavg-full": ([30.0, 30.5, 31.0], [0.2] * 3),
            "local": ([60.0] * 3, [0.0] * 3),  # federates nothing: left out of claims 1 and 2
        },
    )
    assert lines == [
        "- Better mean ROUGE-L than the federated baselines (fedavg, fedavg-full): supported. "
        "flex 42.00, the best of them fedavg 36.00: margin +6.00, std 2.00.",
        "- Least knowledge lost among the methods that federate (flex-random, fedavg, "
        "fedavg-full beside flex), by held-out perplexity increase: not supported. flex +2.00% "
        "(rank 2 of 4), the best of the others flex-random +1.50%: margin -0.50%, std 1.00%.",
        "- Least knowledge lost among the methods that federate (fedavg beside flex), by the "
        "change in MMLU p(right letter): untested (at least one of the two measured on a single "
        "run: no seed-to-seed spread to weigh the margin by). flex -0.0100 (rank 1 of 2), the "
        "best of the others fedavg -0.0300: margin +0.0200, std -.",
        "- Under 1% of fedavg-full's uplink: supported. flex sends 0.50% of it (0.010 MB against "
        "2.000 MB per run).",
    ]


def test_a_lead_within_the_larger_spread_or_over_a_single_run_is_not_called_supported(tmp_path):
    flex = ([40.0, 42.0, 44.0], [0.02] * 3)  # ROUGE-L std 2.0
    within = claims(
        tmp_path / "within",
        {
            "flex": flex,
            "fedavg": ([40.0, 40.5, 41.0], [0.05] * 3),
            "fedavg-full": ([30.0, 31.0, 32.0], [0.05] * 3),
        },
        uplink=1_000_000,
    )  # margin 1.5: above fedavg's std (0.5), below flex's (2.0)
    assert within[0].startswith(
        "- Better mean ROUGE-L than the federated baselines (fedavg, fedavg-full): not shown "
        "(ahead by less than one std). flex 42.00, the best of them fedavg 40.50: margin +1.50"
    )
    assert within[1] == (
        "- Least knowledge lost among the methods that federate (fedavg, fedavg-full beside "
        "flex), by held-out perplexity increase: supported. flex +2.00% (rank 1 of 3), the best "
        "of the others fedavg +5.00%: margin +3.00%, std 0.00%."
    )
    assert within[-1] == (
        "- Under 1% of fedavg-full's uplink: not supported. flex sends 1.00% of it (0.010 MB "
        "against 1.000 MB per run)."
    )
    single = claims(
        tmp_path / "single",
        {"flex": flex, "fedavg": ([10.0], [0.05]), "fedavg-full": ([5.0], [0.1])},
        uplink=0,
    )
    assert (
        "baselines (fedavg, fedavg-full): untested (at least one of the two measured " in single[0]
    )
    assert (
        single[-1]
        == "- Under 1% of fedavg-full's uplink: untested (fedavg-full's runs sent nothing)."
    )


def test_methods_tuned_to_their_own_rates_compare_in_one_table(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / "flex" / f"s{seed}", fake_results("flex", seed, [30.0], lr=1e-3))
    tuned = fake_results("fedprox", 0, [20.0], lr=3e-4, proximal_mu=0.1)
    write_run(tmp_path / "fedprox", tuned)
    report = write_report(tmp_path).read_text()
    assert report.count("\n## ") == 2  # one setting, then the list of runs
    assert table_row(report, "flex")[-1] == "lr 0.001"
    assert table_row(report, "fedprox")[-1] == "lr 0.0003, proximal-mu 0.1"


def test_runs_apart_in_what_they_measure_or_how_long_the_server_waited_are_one_setting(tmp_path):
    runs = {
        "s0": fake_results("flex", 0, [30.0], eval_every=1, mmlu_per_topic=20),
        "s1": fake_results("flex", 1, [32.0], reply_timeout=3600.0),
        "s2": fake_results("flex", 2, [34.0], max_test=8),  # another setting
    }
    for name, results in runs.items():
        write_run(tmp_path / "flex" / name, results)
    report = write_report(tmp_path).read_text()
    assert report.count("\n## ") == 3  # two settings, then the list of runs
    assert "| flex | 2 | 31.00 |" in report and "| flex | 1 | 34.00 |" in report


def test_a_choice_at_an_end_of_its_grid_widens_the_grid_by_half_decades_twice_at_most(tmp_path):
    def tuned(scores: dict[float, float]) -> Tuning:
        return choose(
            [Run(f"{v}", sweep_results("flex", "lr", v, r), None) for v, r in scores.items()]
        )

    assert swept_values("flex", tuned({3e-4: 1.0, 1e-3: 2.0})) == [3e-4, 1e-3, 3e-3]  # unfinished
    assert swept_values("flex", tuned({3e-4: 1.0, 1e-3: 3.0, 3e-3: 2.0})) == [3e-4, 1e-3, 3e-3]
    assert swept_values("flex", tuned({3e-4: 1.0, 1e-3: 2.0, 3e-3: 3.0})) == [
        3e-4,
        1e-3,
        3e-3,
        1e-2,
    ]
    assert swept_values("flex", tuned({3e-4: 3.0, 1e-3: 2.0, 3e-3: 1.0})) == [
        1e-4,
        3e-4,
        1e-3,
        3e-3,
    ]
    inside = tuned({3e-4: 1.0, 1e-3: 2.0, 3e-3: 4.0, 1e-2: 3.0})
    assert swept_values("flex", inside) == [3e-4, 1e-3, 3e-3, 1e-2]  # the best is inside now
    once = tuned({3e-4: 1.0, 1e-3: 2.0, 3e-3: 3.0, 1e-2: 4.0})
    assert swept_values("flex", once) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    twice = tuned({3e-4: 1.0, 1e-3: 2.0, 3e-3: 3.0, 1e-2: 4.0, 3e-2: 5.0})
    assert swept_values("flex", twice) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # a decade at most
    assert at_edge(twice.choices["flex"]) and twice.choices["flex"].chosen == 3e-2
    low = tuned({1e-4: 4.0, 3e-4: 3.0, 1e-3: 2.0, 3e-3: 1.0})
    assert swept_values("flex", low) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
    assert swept_values("fedadam", Tuning({})) == [1e-3, 1e-2, 1e-1]


def test_report_states_what_a_private_run_promised(tmp_path):
    from flexmoe.results import Privacy

    for seed, epsilon in ((0, 7.5), (1, 7.5)):
        results = fake_results("flex", seed, [5.0], dp_noise_multiplier=1.0, dp_clipping_norm=0.5)
        results.privacy = Privacy(
            noise_multiplier=1.0, clipping_norm=0.5, delta=1e-5, epsilon=epsilon
        )
        write_run(tmp_path / f"s{seed}", results)
    report = write_report(tmp_path).read_text()
    assert "updates clipped to 0.5, noise multiplier 1; epsilon 7.50 at delta 1e-05" in report
    assert [c.name for c in MATRICES["privacy"].cells()][3] == "pathological-dp/flex/seed0"


KILLED_BENCH = """
import sys
from flexmoe.benchmark import runner
from flexmoe.cli import main
runner.flexmoe_command = lambda cell, out: ["sleep", "120"]  # a cell that takes its time
main(["bench", "--matrix", "smoke", "--methods", "flex", "--seeds", "0", "--out", sys.argv[1]])
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the reaper reads /proc")
def test_a_killed_bench_takes_its_running_cells_with_it(tmp_path):
    import signal
    import subprocess
    import time

    from flexmoe.federated.reaper import descendants_of, process_table

    bench = subprocess.Popen([sys.executable, "-c", KILLED_BENCH, str(tmp_path)])
    deadline = time.monotonic() + 60
    while not (cells := descendants_of([bench.pid])) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # the watchdog notes the processes every second
    bench.send_signal(signal.SIGKILL)
    bench.wait()
    deadline = time.monotonic() + 15
    while set(cells) & set(process_table()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cells and not set(cells) & set(process_table())
