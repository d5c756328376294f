"""PNG plots of a benchmark folder's runs (matplotlib, Agg backend)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from benchmarks.harness.summary import (
    Run,
    Summary,
    ablation_families,
    ablation_plot,
    group_runs,
    setting_labels,
    setting_plots,
    split_sweep,
)
from flexmoe.schema import kebab

Curve = list[tuple[int, float]]


def rouge_curve(run: Run) -> Curve:
    """Mean ROUGE-L per round from ``rouge_per_round``; empty when the run has none."""
    return [(p.round, p.mean_rouge_l) for p in run.results.rouge_per_round]


def loss_curve(run: Run) -> Curve:
    """Mean training loss per round from rounds.json; empty when the run has none."""
    return [(r.round, r.mean_train_loss) for r in run.rounds or []]


def mean_curve(curves: Sequence[Curve]) -> Curve:
    """Per round, the mean over the curves that have that round."""
    by_round: dict[int, list[float]] = {}
    for curve in curves:
        for round_, value in curve:
            by_round.setdefault(round_, []).append(value)
    return [(r, statistics.fmean(v)) for r, v in sorted(by_round.items())]


def plot_curves(summaries: dict[str, Summary], title: str, path: Path) -> None:
    """ROUGE-L per round (mean over the runs that scored every round) when every method has
    such a run, else mean train loss."""
    scored = {m: [r for r in s.runs if len(rouge_curve(r)) > 1] for m, s in summaries.items()}
    use_rouge = all(scored.values())
    curve, ylabel = (rouge_curve, "mean ROUGE-L") if use_rouge else (loss_curve, "mean train loss")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method, summary in summaries.items():
        points = mean_curve([curve(r) for r in (scored[method] if use_rouge else summary.runs)])
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=method)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
    _finish(figure, axes, title, "round", ylabel, path)


def plot_clients(summaries: dict[str, Summary], title: str, path: Path) -> None:
    """Grouped bars: each client's ROUGE-L (mean over seeds) under each method."""
    scores = {method: s.client_rouge() for method, s in summaries.items()}
    clients = sorted({cid for per_client in scores.values() for cid in per_client})
    width = 0.8 / len(scores)
    figure, axes = plt.subplots(figsize=(max(7.0, 0.6 * len(clients) * len(scores) ** 0.5), 4.5))
    for i, (method, per_client) in enumerate(scores.items()):
        xs = [c + (i - (len(scores) - 1) / 2) * width for c in range(len(clients))]
        axes.bar(xs, [per_client.get(cid, 0.0) for cid in clients], width, label=method)
    axes.set_xticks(range(len(clients)), [str(cid) for cid in clients])
    _finish(figure, axes, title, "client", "ROUGE-L", path)


def plot_quality_vs_uplink(summaries: dict[str, Summary], title: str, path: Path) -> None:
    """Mean ROUGE-L (with its std over seeds) against uplink bytes per run, log scale."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method, s in summaries.items():
        up = s.traffic("bytes_up")
        if up > 0:  # methods that send nothing (local) have no place on a log axis
            axes.errorbar([up], [s.rouge], yerr=[s.rouge_std or 0.0], fmt="o", label=method)
    axes.set_xscale("log")
    _finish(
        figure,
        axes,
        f"{title} (no-uplink methods left out)",
        "uplink bytes / run",
        "mean ROUGE-L",
        path,
    )


def plot_ablation(
    name: str, members: Sequence[tuple[float, dict[str, Summary]]], title: str, path: Path
) -> None:
    """Mean ROUGE-L (with its std) against the ablated setting's value, per method."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    methods = sorted({m for _, summaries in members for m in summaries})
    for method in methods:
        points = [(v, s[method]) for v, s in members if method in s]
        xs, ys = [v for v, _ in points], [x.rouge for _, x in points]
        axes.errorbar(
            xs, ys, yerr=[x.rouge_std or 0.0 for _, x in points], marker="o", label=method
        )
    _finish(figure, axes, title, kebab(name), "mean ROUGE-L", path)


def _finish(figure, axes, title: str, xlabel: str, ylabel: str, path: Path) -> None:
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_plots(runs: Sequence[Run], folder: Path) -> list[Path]:
    """Every plot report.md links to, written under ``folder``; older plots there are removed."""
    for stale in folder.glob("*.png"):
        stale.unlink()
    grouped = group_runs(split_sweep(runs)[0])
    labels = setting_labels(grouped)
    written = []
    kinds = {
        "curves": plot_curves,
        "clients": plot_clients,
        "quality-vs-uplink": plot_quality_vs_uplink,
    }
    for setting, summaries in grouped.items():
        for kind, file in setting_plots(labels[setting]).items():
            kinds[kind](summaries, labels[setting], folder / file)
            written.append(folder / file)
    for name, members in ablation_families(grouped):
        file = folder / ablation_plot(labels[members[0]], name)
        points = [(dict(s)[name], grouped[s]) for s in members]
        plot_ablation(name, points, file.stem, file)
        written.append(file)
    return written
