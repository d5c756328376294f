"""report.md: a benchmark folder's runs as Markdown tables, a function of their JSON alone."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from flexmoe.benchmark.summary import (
    PLOTS_DIR,
    Run,
    Setting,
    Summary,
    ablation_families,
    ablation_plot,
    family_label,
    group_runs,
    layer_shifts,
    routing_summary,
    setting_labels,
    setting_plots,
)
from flexmoe.results import Knowledge
from flexmoe.runconfig import option_name

REFERENCE = "fedavg-full"  # traffic is compared with naive dense FL

FLEX = "flex"

NONE = "-"


def _number(value: float | None, spec: str = ".2f") -> str:
    return NONE if value is None else format(value, spec)


def _megabytes_cell(count: float) -> str:
    """Megabytes for a table column whose header names the unit."""
    return f"{count / 1e6:.3f}"


def _percent(value: float | None) -> str:
    return NONE if value is None else f"{100 * value:+.2f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def best_line(label: str, summaries: dict[str, Summary]) -> list[str]:
    """Which method has the best mean ROUGE-L, and where FLEx stands when it is not it."""
    ranked = sorted(summaries, key=lambda m: -summaries[m].rouge)
    top = summaries[ranked[0]].rouge
    best = [m for m in ranked if summaries[m].rouge == top]
    lines = [f"Best mean ROUGE-L on {label}: {', '.join(best)} ({top:.2f})."]
    if FLEX in summaries and FLEX not in best:
        flex = summaries[FLEX].rouge
        rank = 1 + sum(summaries[m].rouge > flex for m in summaries)
        lines.append(
            f"FLEx ({FLEX}) does not have the best mean ROUGE-L here: {flex:.2f}, "
            f"rank {rank} of {len(summaries)}, {top - flex:.2f} below {best[0]}."
        )
    elif FLEX in summaries and len(summaries) > 1:
        lines.append(f"FLEx ({FLEX}) has the best mean ROUGE-L here.")
    return [*lines, ""]


def repeated_seeds(summaries: dict[str, Summary]) -> list[str]:
    """A warning per method with several runs of one seed (all of them are averaged)."""
    lines = []
    for method, summary in summaries.items():
        seeds = [run.config.get("seed") for run in summary.runs]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1}, key=repr)
        if repeated:
            folders = ", ".join(r.path for r in summary.runs if r.config.get("seed") in repeated)
            lines.append(f"Warning: {method} has several runs of seed {repeated} ({folders}).")
    return [*lines, ""] if lines else []


def method_table(summaries: dict[str, Summary]) -> list[str]:
    """Per method: seeds, mean and std of mean ROUGE-L, knowledge loss, traffic."""
    reference = summaries.get(REFERENCE)
    total = reference and reference.traffic("bytes_up") + reference.traffic("bytes_down")
    rows = []
    for method, s in summaries.items():
        traffic = s.traffic("bytes_up") + s.traffic("bytes_down")
        rows.append([
            method, str(s.n), f"{s.rouge:.2f}", _number(s.rouge_std), _percent(s.ppl_increase),
            _megabytes_cell(s.traffic("bytes_up")), _megabytes_cell(s.traffic("bytes_down")),
            format(traffic / total, ".3g") if total else NONE,
        ])  # fmt: skip
    header = [
        "method", "seeds", "mean ROUGE-L", "std", "held-out ppl increase",
        "MB up / run", "MB down / run", f"traffic / {REFERENCE}",
    ]  # fmt: skip
    return _table(header, rows)


def client_table(summaries: dict[str, Summary]) -> list[str]:
    """Per client: its categories and its ROUGE-L under every method (mean over seeds)."""
    scores = {method: s.client_rouge() for method, s in summaries.items()}
    clients = sorted({cid for per_client in scores.values() for cid in per_client})
    categories = _client_categories([r for s in summaries.values() for r in s.runs])
    rows = [
        [str(cid), categories.get(cid, NONE), *(_number(scores[m].get(cid)) for m in summaries)]
        for cid in clients
    ]
    return _table(["client", "categories", *summaries], rows)


def _client_categories(runs: Iterable[Run]) -> dict[int, str]:
    """Each client's categories when every run agrees on them, else a note that they vary."""
    seen: dict[int, set[tuple[str, ...]]] = {}
    for run in runs:
        for client in run.results.clients:
            seen.setdefault(client.client_id, set()).add(tuple(client.categories))
    return {
        cid: _categories(next(iter(s))) if len(s) == 1 else "varies by seed"
        for cid, s in seen.items()
    }


def _categories(names: Sequence[str], shown: int = 3) -> str:
    text = ", ".join(names[:shown])
    return text + (f" +{len(names) - shown} more" if len(names) > shown else "")


def _measured(summaries: dict[str, Summary], key: str) -> dict[str, list]:
    """Per method, the ``key`` record of every client that has one; methods without any left out."""
    found = {
        m: [getattr(c, key) for c in s.clients() if getattr(c, key) is not None]
        for m, s in summaries.items()
    }
    return {m: records for m, records in found.items() if records}


def knowledge_table(summaries: dict[str, Summary]) -> list[str]:
    """Held-out perplexity per pretraining domain, base model and each method's final models."""
    measured = _measured(summaries, "knowledge")
    if not measured:
        return []
    first = next(iter(measured.values()))

    def mean_ppl(records: list[Knowledge], stage: str, domain: str) -> str:
        return _number(statistics.fmean(getattr(r, stage)[domain] for r in records))

    rows = [
        [domain, mean_ppl(first, "heldout_ppl_base", domain),
         *(mean_ppl(records, "heldout_ppl", domain) for records in measured.values())]
        for domain in sorted(first[0].heldout_ppl_base)
    ]  # fmt: skip
    title = "Held-out perplexity per pretraining domain (mean over clients and seeds):"
    return [title, "", *_table(["domain", "base model", *measured], rows)]


def routing_table(summaries: dict[str, Summary]) -> list[str]:
    """Per method: routing shift, entropies before and after, grafted gate openness, FLOPs;
    then the routing shift per layer."""
    measured = _measured(summaries, "routing")
    if not measured:
        return []
    shifts = {method: layer_shifts(routed) for method, routed in measured.items()}
    rows = []
    for method, routed in measured.items():
        r = routing_summary(routed)
        overall = statistics.fmean(v for values in shifts[method].values() for v in values)
        rows.append([
            method, format(overall, ".3f"),
            f"{r['utilisation_entropy_base']:.3f} -> {r['utilisation_entropy_final']:.3f}",
            f"{r['token_entropy_base']:.3f} -> {r['token_entropy_final']:.3f}",
            _number(r["gate"], ".3f"), _number(summaries[method].flops_ratio, ".3f"),
        ])  # fmt: skip
    header = [
        "method", "routing shift (TV)", "utilisation entropy", "token entropy",
        "grafted gate mean", "MoE FLOPs / token vs base",
    ]  # fmt: skip
    layers = {m: {n: statistics.fmean(v) for n, v in per.items()} for m, per in shifts.items()}
    numbers = sorted({layer for per_layer in layers.values() for layer in per_layer})
    per_layer = [[str(n), *(_number(layers[m].get(n), ".3f") for m in layers)] for n in numbers]
    return [
        "Routing on the clients' test data, base model -> final model (the routers are frozen, "
        "so a shift comes from trained attention and grafts), and MoE compute per token:",
        "",
        *_table(header, rows),
        "Routing shift (TV) per MoE layer:",
        "",
        *_table(["layer", *layers], per_layer),
    ]


def graft_table(summaries: dict[str, Summary], shown: int = 4) -> list[str]:
    """Per grafting method, the most common per-layer choices of grafted experts and how many
    clients (over all seeds) made each: personalisation by selection shows as many plans."""
    measured = _measured(summaries, "grafted_experts")
    rows = []
    for method, plans in measured.items():
        counts: dict[str, int] = {}
        for plan in plans:
            key = "; ".join(f"{layer}: {experts}" for layer, experts in plan.items())
            counts[key] = counts.get(key, 0) + 1
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        rows += [[method, f"{n} of {len(plans)}", plan] for plan, n in ranked[:shown]]
        if len(ranked) > shown:
            rows.append([method, f"{len(plans) - sum(n for _, n in ranked[:shown])} more", "..."])
    if not rows:
        return []
    title = "Grafted experts (MoE layer: source experts), by how many clients chose them:"
    return [title, "", *_table(["method", "clients", "grafted experts"], rows)]


def ablation_section(
    grouped: dict[Setting, dict[str, Summary]], labels: dict[Setting, str]
) -> list[str]:
    lines = []
    for name, members in ablation_families(grouped):
        lines += [f"### {option_name(name)} ({family_label(labels[members[0]], name)})", ""]
        rows = [
            [str(dict(s)[name]), m, str(x.n), f"{x.rouge:.2f}", _number(x.rouge_std),
             _percent(x.ppl_increase), _number(x.flops_ratio, ".3f"),
             _megabytes_cell(x.traffic("bytes_up"))]
            for s in members
            for m, x in grouped[s].items()
        ]  # fmt: skip
        header = [
            option_name(name),
            "method",
            "seeds",
            "mean ROUGE-L",
            "std",
            "held-out ppl increase",
        ]
        lines += _table([*header, "MoE FLOPs ratio", "MB up / run"], rows)
        lines += [f"![{name}]({PLOTS_DIR}/{ablation_plot(labels[members[0]], name)})", ""]
    return ["## Ablations", "", *lines] if lines else []


def render_report(runs: Sequence[Run]) -> str:
    """report.md for ``runs``: a function of their JSON files only."""
    grouped = group_runs(runs)
    labels = setting_labels(grouped)
    lines = [
        "# Benchmark report",
        "",
        f"Made by `flexmoe report` from {len(runs)} results.json files. ROUGE-L is F1 x 100 on "
        "each client's own test split; a run's score is its mean over clients. `mean ROUGE-L` "
        "and `std` are the mean and sample standard deviation over runs (seeds). Traffic is "
        f"bytes per run, and `traffic / {REFERENCE}` compares up plus down with {REFERENCE}. "
        "`held-out ppl increase` is the mean relative increase of held-out perplexity over the "
        "base model. Routing shift is the total-variation distance between the base and the "
        "final model's expert utilisation (0: unchanged, 1: disjoint); the grafted gate mean is "
        "the mean sigmoid gate of the grafted experts over test tokens.",
        "",
    ]
    for setting, summaries in grouped.items():
        label = labels[setting]
        plots = setting_plots(label)
        lines += [f"## {label}", "", *best_line(label, summaries), *repeated_seeds(summaries)]
        lines += method_table(summaries)
        lines += ["Per-client ROUGE-L (mean over seeds):", "", *client_table(summaries)]
        lines += knowledge_table(summaries) + routing_table(summaries) + graft_table(summaries)
        lines += [f"![{kind}]({PLOTS_DIR}/{file})" for kind, file in plots.items()] + [""]
    lines += ablation_section(grouped, labels)
    rows = [
        [r.path, r.method, str(r.config.get("seed", NONE)), f"{r.results.mean_rouge_l:.2f}"]
        for r in runs
    ]
    lines += ["## Runs", "", *_table(["folder", "method", "seed", "mean ROUGE-L"], rows)]
    return "\n".join(lines).rstrip("\n") + "\n"
