"""report.md and its plots, a function of the results files alone."""

import json
import statistics

import numpy as np
import pytest

from benchmarks import report
from benchmarks.harness.matrix import MATRICES
from benchmarks.harness.plots import loss_curve, mean_curve, rouge_curve
from benchmarks.harness.report import write_report
from benchmarks.harness.summary import Run, load_runs, read_predictions, write_predictions
from flexmoe.errors import FlexMoEError
from flexmoe.results import (
    Knowledge,
    MMLUScore,
    RougePoint,
    Routing,
    write_results,
)
from tests.benchmarks.fakes import (
    PNG_MAGIC,
    SCORES,
    claims,
    fake_results,
    routing_record,
    sweep_results,
    table_row,
    train_losses,
    write_run,
)


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


def test_graft_variants_are_arms_of_one_setting_and_client_counts_an_ablation(tmp_path):
    for r, score in ((1, 30.0), (2, 34.0), (3, 33.0)):
        for seed in (0, 1):
            results = fake_results("flex", seed, [score + seed], experts_per_layer=r)
            write_run(tmp_path / f"experts-per-layer-{r}" / "flex" / f"seed{seed}", results)
    for clients, score in ((4, 20.0), (10, 22.0)):
        results = fake_results("flex", 0, [score], split="dirichlet", clients=clients)
        write_run(tmp_path / f"clients-{clients}" / "flex" / "seed0", results)
    report = write_report(tmp_path).read_text()
    assert report.count("\n## pathological") == 1  # the variants share the same test examples
    assert table_row(report, "flex (experts-per-layer 2)")[1:4] == ["2", "34.50", "0.71"]
    assert table_row(report, "flex")[1:3] == ["2", "30.50"]
    assert "### clients (dirichlet-1.0)" in report  # other clients: other test examples
    assert (tmp_path / "plots" / "ablation-clients-dirichlet-1.0.png").is_file()


def test_curves_prefer_rouge_per_round_and_average_over_seeds():
    results = fake_results("flex", 0, [1.0])
    run = Run("x", results, train_losses(2.0))
    assert rouge_curve(run) == [] and loss_curve(run) == [(1, 2.0)]
    results.rouge_per_round = [RougePoint(round=1, mean_rouge_l=5.0)]
    assert rouge_curve(Run("x", results, None)) == [(1, 5.0)]
    assert mean_curve([[(1, 1.0), (2, 3.0)], [(1, 3.0)]]) == [(1, 2.0), (2, 3.0)]


def test_report_of_a_folder_without_valid_results_is_an_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text('{"method": "flex"}')
    assert report.main([str(tmp_path)]) == 2
    assert "is not a flexmoe results file" in capsys.readouterr().err


def test_run_summary_table_states_traffic_in_megabytes():
    from flexmoe.cli.run import results_table

    table = results_table(fake_results("fedavg-full", 0, [10.0, 30.0]))
    assert table.splitlines()[-1].startswith(
        "mean ROUGE-L 20.00   uplink 1.00 MB   downlink 1.00 MB"
    )
    assert "task-1" in table


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


def test_report_shows_mmlu_selection_agreement_predictions_and_the_sweep(tmp_path):
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
        kept = write_predictions(folder)  # every example, and no prompt or reference text
        assert "reference" not in kept.read_text() and "Name it." not in kept.read_text()
        predictions = read_predictions(folder)
        assert list(predictions) == [1] and len(predictions[1]) == 3
        fields = ("prompt_id", "category", "rouge_l", "prediction")
        assert predictions[1][0] == {key: rows[0][key] for key in fields}
    write_run(
        tmp_path / "fedavg", fake_results("fedavg", 0, [20.0], split="pathological", clients=2)
    )
    for lr, rouge in ((3e-4, 12.0), (1e-3, 14.0)):
        write_run(tmp_path / "sweep" / f"lr-{lr:g}", sweep_results("fedavg", "lr", lr, rouge))
    report = write_report(tmp_path).read_text()
    assert (  # fedavg kept no per-example scores: nothing to pair flex's with
        "- Better ROUGE-L than the federated baselines (fedavg): untested (not paired: no seed "
        "where both kept each test example's ROUGE-L)." in report
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


def synthetic(shift: float, ppl: float, seeds=(0, 1, 2), spread=8.0) -> dict:
    """seed -> (two clients' per-example ROUGE-L: a method ``shift`` points above a common
    base, with independent noise; their held-out perplexity on three domains, base 10)."""
    arm = {}
    for seed in seeds:
        base = np.random.default_rng(seed).uniform(0, 60, size=(2, 40))
        noise = np.random.default_rng([seed, int(100 * shift) + 1000]).normal(0, spread, (2, 40))
        rouges = np.clip(base + shift + noise, 0, 100).round(2).tolist()
        domains = [{d: ppl + 0.01 * (seed + i + c) for i, d in enumerate("abc")} for c in (0, 1)]
        arm[seed] = (rouges, domains)
    return arm


def test_claims_are_supported_only_where_paired_intervals_exclude_zero(tmp_path):
    lines = claims(
        tmp_path,
        {
            "flex": synthetic(10.0, 10.2),
            "flex-random": synthetic(0.0, 10.9),  # grafts: not a federated baseline
            "fedavg": synthetic(0.0, 10.0),
            "fedavg-full": synthetic(-5.0, 11.0),
            "local": synthetic(10.0, 10.8),  # as good as flex by ROUGE-L
        },
    )
    assert lines == [
        "- Better ROUGE-L than the federated baselines (fedavg, fedavg-full): supported.",
        "- Better ROUGE-L than every other method (flex-random, fedavg, fedavg-full, local): not "
        "supported (no difference shown against local).",
        "- Least knowledge lost (held-out perplexity increase) among the methods that "
        "personalise (flex-random, local): supported.",
        "- Under 1% of fedavg-full's uplink: supported. flex sends 0.50% of it (0.010 MB against "
        "2.000 MB per run).",
    ]
    report = (tmp_path / "report.md").read_text()
    row = table_row(report, "flex", after="| first |")
    assert row[1:5] == ["flex-random", "ROUGE-L", "3", "240"]
    low, high = (float(x) for x in row[6].split(" at ")[0].strip("[]").split(", "))
    assert low < 10.0 < high and low > 0  # the known difference, inside its interval
    assert row[-1] == "flex better"


def test_a_flex_no_better_than_a_baseline_or_worse_is_not_supported(tmp_path):
    lines = claims(
        tmp_path,
        {
            "flex": synthetic(0.0, 10.2, seeds=(0, 1)),  # fedavg's very scores
            "fedavg": synthetic(0.0, 10.0, seeds=(0, 1)),
            "fedsa-lora": synthetic(6.0, 10.1, seeds=(0, 1)),
            "fedavg-full": synthetic(0.0, 10.0, seeds=(0,)),
        },
        uplink=0,
    )
    assert lines[0] == (
        "- Better ROUGE-L than the federated baselines (fedavg, fedavg-full, fedsa-lora): not "
        "supported (worse than fedsa-lora; no difference shown against fedavg, fedavg-full)."
    )
    assert lines[-1] == (
        "- Under 1% of fedavg-full's uplink: untested (fedavg-full's runs sent nothing)."
    )


def test_arms_are_named_as_the_bench_ran_them_or_by_their_variant(tmp_path):
    for arm, lr in (("flex", 1e-3), ("flex-at-fedavg-lr", 3e-4)):
        folder = write_run(tmp_path / arm / "seed0", fake_results("flex", 0, [30.0], lr=lr))
        (tmp_path / arm / "seed0.provenance.json").write_text(
            json.dumps(
                {"arm": arm, "starts": [{"commit": "abcdef123", "uncommitted_changes": True}]}
            )
        )
        assert folder.is_dir()
    answer = fake_results("flex", 0, [31.0], lr=1e-3, selection_tokens="answer")
    write_run(tmp_path / "flex-answer", answer)  # no provenance: named by its variant
    for lr in (1e-3, 3e-4):  # nor here: each rate apart
        write_run(tmp_path / f"fedavg-{lr:g}", fake_results("fedavg", 0, [20.0], lr=lr))
    report = write_report(tmp_path).read_text()
    assert table_row(report, "flex-at-fedavg-lr")[2] == "30.00"
    assert table_row(report, "flex (selection-tokens answer)")[2] == "31.00"
    assert table_row(report, "fedavg, lr 0.0003")[1] == "1"
    assert "The paper's claims for flex-at-fedavg-lr:" in report
    assert table_row(report, "flex/seed0", after="## Runs")[-1] == "abcdef1*"


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
