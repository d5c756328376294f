"""report.md: a benchmark folder's runs as Markdown tables, a function of their JSON alone."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from benchmarks.harness.summary import (
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
    selection_agreement,
    setting_labels,
    setting_plots,
    split_sweep,
)
from benchmarks.harness.tuning import MAX_WIDENINGS, Choice, at_edge, choose
from flexmoe.methods import METHODS
from flexmoe.results import Knowledge, MMLUScore
from flexmoe.schema import kebab

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
    if FLEX in summaries and len(summaries) > 1:
        lines.append(margin_line(summaries))
    return [*lines, ""]


def margin_line(summaries: dict[str, Summary]) -> str:
    """FLEx's margin over the best other method, beside both methods' seed-to-seed spread."""
    lead = _lead(_rouge_per_run(summaries), [m for m in summaries if m != FLEX])
    if lead.spread is None:
        return (
            f"Margin over {lead.rival}: {lead.margin:+.2f} ({ONE_RUN}: no spread to weigh it by)."
        )
    verdict = "more" if abs(lead.margin) > lead.spread else "no more"
    return (
        f"Margin over the best other method, {lead.rival}: {lead.margin:+.2f}, {verdict} than "
        f"one seed-to-seed standard deviation ({FLEX} {_number(summaries[FLEX].rouge_std)}, "
        f"{lead.rival} {_number(summaries[lead.rival].rouge_std)})."
    )


ONE_RUN = "at least one of the two measured on a single run"


class Lead(NamedTuple):
    """FLEx against the best of its rivals by a measure taken once per run."""

    rival: str
    flex_mean: float
    rival_mean: float
    margin: float  # positive: FLEx is ahead
    spread: float | None  # the larger seed-to-seed std of the two; None unless both have two runs
    rank: int  # FLEx's among itself and the rivals (ties share one)


def _lead(per_run: dict[str, list[float]], rivals: Sequence[str], higher_is_better=True) -> Lead:
    sign = 1 if higher_is_better else -1
    score = {m: sign * statistics.fmean(per_run[m]) for m in (FLEX, *rivals)}
    rival = max(rivals, key=score.__getitem__)
    pair = (per_run[FLEX], per_run[rival])
    spread = max(map(statistics.stdev, pair)) if min(map(len, pair)) > 1 else None
    rank = 1 + sum(value > score[FLEX] for value in score.values())
    means = (sign * score[FLEX], sign * score[rival])
    return Lead(rival, *means, score[FLEX] - score[rival], spread, rank)


def _rouge_per_run(summaries: dict[str, Summary]) -> dict[str, list[float]]:
    return {m: [r.results.mean_rouge_l for r in s.runs] for m, s in summaries.items()}


def claims_section(summaries: dict[str, Summary]) -> list[str]:
    """The paper's three claims for FLEx, each weighed against this setting's runs."""
    if FLEX not in summaries or len(summaries) < 2:
        return []
    claims = [rouge_claim(summaries), *knowledge_claims(summaries), traffic_claim(summaries)]
    return [
        "The paper's claims on these runs (a margin is supported when it exceeds the larger "
        "seed-to-seed standard deviation of the two methods):",
        "",
        *(f"- {claim}" for claim in claims if claim),
        "",
    ]


def _verdict(lead: Lead) -> str:
    """Whether FLEx's lead holds against the seed-to-seed spread."""
    if lead.margin <= 0:
        return "not supported"
    if lead.spread is None:
        return f"untested ({ONE_RUN}: no seed-to-seed spread to weigh the margin by)"
    return "supported" if lead.margin > lead.spread else "not shown (ahead by less than one std)"


def rouge_claim(summaries: dict[str, Summary]) -> str | None:
    """Claim 1: a better mean ROUGE-L than every federated baseline (methods that graft nothing)."""
    baselines = [m for m in summaries if _federates(m) and not METHODS[m].grafts]
    if not baselines:
        return None
    lead = _lead(_rouge_per_run(summaries), baselines)
    return (
        f"Better mean ROUGE-L than the federated baselines ({', '.join(baselines)}): "
        f"{_verdict(lead)}. {FLEX} {lead.flex_mean:.2f}, the best of them {lead.rival} "
        f"{lead.rival_mean:.2f}: margin {lead.margin:+.2f}, std {_number(lead.spread)}."
    )


class KnowledgeMeasure(NamedTuple):
    name: str
    per_run: Callable[[Run], float | None]
    higher_is_better: bool
    shown: Callable[[float], str]


def _mmlu_probability_change(run: Run) -> float | None:
    """The change in MMLU probability of the right letter from the base to the final models,
    mean over the run's clients that scored MMLU."""
    pairs = _mmlu_pairs(c.knowledge for c in run.results.clients)
    return (
        statistics.fmean(f.correct_probability - b.correct_probability for b, f in pairs)
        if pairs
        else None
    )


KNOWLEDGE_MEASURES = (
    KnowledgeMeasure(
        "held-out perplexity increase", lambda run: run.results.mean_ppl_increase, False, _percent
    ),
    KnowledgeMeasure(
        "the change in MMLU p(right letter)", _mmlu_probability_change, True, lambda v: f"{v:+.4f}"
    ),
)


def knowledge_claims(summaries: dict[str, Summary]) -> list[str]:
    """Claim 2: the least knowledge lost among the methods that federate (FLEx's ablations
    included), by each measure the runs took."""
    claims = []
    for measure in KNOWLEDGE_MEASURES:
        per_run = {
            m: [v for v in map(measure.per_run, s.runs) if v is not None]
            for m, s in summaries.items()
            if _federates(m)
        }
        per_run = {m: values for m, values in per_run.items() if values}
        if FLEX in per_run and len(per_run) > 1:
            claims.append(_least_lost_claim(measure, per_run))
    return claims


def _least_lost_claim(measure: KnowledgeMeasure, per_run: dict[str, list[float]]) -> str:
    """Where FLEx ranks by ``measure`` among ``per_run``'s methods, and its margin."""
    rivals = [m for m in per_run if m != FLEX]
    lead = _lead(per_run, rivals, measure.higher_is_better)
    spread = NONE if lead.spread is None else measure.shown(lead.spread).lstrip("+")
    return (
        f"Least knowledge lost among the methods that federate ({', '.join(rivals)} beside "
        f"{FLEX}), by {measure.name}: {_verdict(lead)}. {FLEX} {measure.shown(lead.flex_mean)} "
        f"(rank {lead.rank} of {len(per_run)}), the best of the others {lead.rival} "
        f"{measure.shown(lead.rival_mean)}: margin {measure.shown(lead.margin)}, std {spread}."
    )


def traffic_claim(summaries: dict[str, Summary]) -> str | None:
    """Claim 3: far less traffic, taken as under 1% of fedavg-full's uplink."""
    if REFERENCE not in summaries:
        return None
    flex, full = (summaries[m].traffic("bytes_up") for m in (FLEX, REFERENCE))
    if full == 0:
        return f"Under 1% of {REFERENCE}'s uplink: untested ({REFERENCE}'s runs sent nothing)."
    ratio = flex / full
    verdict = "supported" if ratio < 0.01 else "not supported"
    return (
        f"Under 1% of {REFERENCE}'s uplink: {verdict}. {FLEX} sends {ratio:.2%} of it "
        f"({_megabytes_cell(flex)} MB against {_megabytes_cell(full)} MB per run)."
    )


def _federates(method: str) -> bool:
    return method in METHODS and METHODS[method].federated


def privacy_line(summaries: dict[str, Summary]) -> list[str]:
    """What the private runs of a setting promised: epsilon at delta, from their accountants."""
    private = [r.results.privacy for s in summaries.values() for r in s.runs if r.results.privacy]
    if not private:
        return []
    first = private[0]
    spent = sorted({_number(p.epsilon) for p in private})
    return [
        f"Client-level differential privacy: updates clipped to {first.clipping_norm:g}, noise "
        f"multiplier {first.noise_multiplier:g}; epsilon {' / '.join(spent)} at delta "
        f"{first.delta:g} (Flower's RDP accountant, no credit for sampling).",
        "",
    ]


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
            format(traffic / total, ".3g") if total else NONE, s.hyperparameters(),
        ])  # fmt: skip
    header = [
        "method", "seeds", "mean ROUGE-L", "std", "held-out ppl increase",
        "MB up / run", "MB down / run", f"traffic / {REFERENCE}", "hyperparameters",
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
    return [title, "", *_table(["domain", "base model", *measured], rows), *mmlu_table(measured)]


def mmlu_table(measured: dict[str, list[Knowledge]]) -> list[str]:
    """MMLU 0-shot of the base and of each method's final models, where the runs scored it."""
    rows = []
    for method, records in measured.items():
        pairs = _mmlu_pairs(records)
        if not pairs:
            continue
        base = [b for b, _ in pairs]
        final = [f for _, f in pairs]
        right = statistics.fmean([f.correct_probability for f in final])
        right_base = statistics.fmean([b.correct_probability for b in base])
        rows.append([
            method, str(len(pairs)), str(final[0].questions),
            f"{100 * statistics.fmean([b.accuracy for b in base]):.2f}",
            f"{100 * statistics.fmean([f.accuracy for f in final]):.2f}",
            f"{right_base:.4f}", f"{right:.4f}", f"{right - right_base:+.4f}",
        ])  # fmt: skip
    if not rows:
        return []
    header = [
        "method", "client models", "questions", "base accuracy %", "final accuracy %",
        "base p(right letter)", "final p(right letter)", "change",
    ]  # fmt: skip
    return [
        "MMLU 0-shot (letter log-likelihood; mean over the client models scored). The probability "
        "given to the right letter (softmax over the four) moves even where accuracy sits at "
        "chance:",
        "",
        *_table(header, rows),
    ]


def _mmlu_pairs(records: Iterable[Knowledge | None]) -> list[tuple[MMLUScore, MMLUScore]]:
    """``(base, final)`` MMLU scores of the records that hold both."""
    return [(k.mmlu_base, k.mmlu) for k in records if k and k.mmlu and k.mmlu_base]


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


def selection_table(summaries: dict[str, Summary]) -> list[str]:
    """Per grafting method, how often a run's clients graft different experts in a layer."""
    rows = []
    for method, summary in summaries.items():
        agreement = selection_agreement(summary.runs)
        if agreement is not None:
            distinct, differing = agreement
            rows.append([method, f"{distinct:.2f}", f"{100 * differing:.1f}%"])
    if not rows:
        return []
    return [
        "Do clients choose differently? Per MoE layer of a run: the number of distinct grafted "
        "experts among its clients, and the share of client pairs that graft different ones "
        "(mean over layers and runs):",
        "",
        *_table(["method", "distinct experts per layer", "client pairs differing"], rows),
    ]


def graft_table(summaries: dict[str, Summary], shown: int = 4, max_layers: int = 8) -> list[str]:
    """Per grafting method, the most common per-layer choices of grafted experts and how many
    clients (over all seeds) made each: personalisation by selection shows as many plans.
    Models deeper than ``max_layers`` get ``selection_table`` alone."""
    measured = _measured(summaries, "grafted_experts")
    if any(len(plan) > max_layers for plans in measured.values() for plan in plans):
        return selection_table(summaries)
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
        lines += [f"### {kebab(name)} ({family_label(labels[members[0]], name)})", ""]
        rows = [
            [str(dict(s)[name]), m, str(x.n), f"{x.rouge:.2f}", _number(x.rouge_std),
             _percent(x.ppl_increase), _number(x.flops_ratio, ".3f"),
             _megabytes_cell(x.traffic("bytes_up"))]
            for s in members
            for m, x in grouped[s].items()
        ]  # fmt: skip
        header = [
            kebab(name),
            "method",
            "seeds",
            "mean ROUGE-L",
            "std",
            "held-out ppl increase",
        ]
        lines += _table([*header, "MoE FLOPs ratio", "MB up / run"], rows)
        lines += [f"![{name}]({PLOTS_DIR}/{ablation_plot(labels[members[0]], name)})", ""]
    return ["## Ablations", "", *lines] if lines else []


def samples_section(summaries: dict[str, Summary], width: int = 90) -> list[str]:
    """Per method, the first test predictions of each client in its lowest seed's run."""
    rows = []
    for method, summary in summaries.items():
        run = min(summary.runs, key=lambda r: (r.config.get("seed", 0), r.path))
        for client, predictions in sorted(run.samples.items()):
            rows += [
                [method, str(client), _cell(p["category"] or NONE, 28), p["prompt_id"],
                 _cell(p["prediction"], width), f"{p['rouge_l']:.1f}"]
                for p in predictions
            ]  # fmt: skip
    if not rows:
        return []
    header = ["method", "client", "category", "prompt id", "prediction", "ROUGE-L"]
    return [
        "Sample test predictions (each client's first two, lowest seed). Each client keeps all "
        "of them, with prompt and reference, beside its state (never sent to the server); the "
        "reference texts quote the data set and stay out of this report:",
        "",
        *_table(header, rows),
    ]


def _cell(text: str, width: int) -> str:
    """``text`` on one line of a table cell, cut to ``width`` characters."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def sweep_section(runs: Sequence[Run]) -> list[str]:
    """The hyperparameter sweep: every value's mean validation ROUGE-L, and the choice."""
    tuning = choose(runs)
    rows = [
        [method, kebab(choice.setting), value, f"{score:.2f}",
         _chosen_mark(choice) if float(value) == choice.chosen else ""]
        for method, choice in tuning.choices.items()
        for value, score in choice.scores.items()
    ]  # fmt: skip
    if not rows:
        return []
    return [
        "## Hyperparameter sweep",
        "",
        "Seed 0, scored on each client's validation split (carved from its training data; the "
        f"test split is never seen), each grid widened by a half-decade, up to {MAX_WIDENINGS} "
        "times, while its best value was at an end. Methods not listed take the choice of the "
        "method they train as (FLEx's ablations FLEx's, FedAvg's server-side variants FedAvg's "
        "learning rate).",
        "",
        *_table(["method", "setting", "value", "mean validation ROUGE-L", ""], rows),
    ]


def _chosen_mark(choice: Choice) -> str:
    return "chosen, at the edge of the sweep" if at_edge(choice) else "chosen"


def render_report(runs: Sequence[Run]) -> str:
    """report.md for ``runs``: a function of their JSON files only."""
    files = len(runs)
    runs, sweep = split_sweep(runs)
    grouped = group_runs(runs)
    labels = setting_labels(grouped)
    lines = [
        "# Benchmark report",
        "",
        f"Made by `python -m benchmarks.report` from {files} results.json files. ROUGE-L is "
        "F1 x 100 on each client's own test split; a run's score is its mean over clients. "
        "`mean ROUGE-L` and `std` are the mean and sample standard deviation over runs (seeds). "
        f"Traffic is bytes per run, and `traffic / {REFERENCE}` compares up plus down with "
        f"{REFERENCE}. `held-out ppl increase` is the mean relative increase of held-out "
        "perplexity over the base model. Routing shift is the total-variation distance between "
        "the base and the final model's expert utilisation (0: unchanged, 1: disjoint); the "
        "grafted gate mean is the mean sigmoid gate of the grafted experts over test tokens.",
        "",
    ]
    for setting, summaries in grouped.items():
        label = labels[setting]
        plots = setting_plots(label)
        lines += [f"## {label}", "", *best_line(label, summaries), *repeated_seeds(summaries)]
        lines += privacy_line(summaries)
        lines += method_table(summaries) + claims_section(summaries)
        lines += ["Per-client ROUGE-L (mean over seeds):", "", *client_table(summaries)]
        lines += knowledge_table(summaries) + routing_table(summaries) + graft_table(summaries)
        lines += samples_section(summaries)
        lines += [f"![{kind}]({PLOTS_DIR}/{file})" for kind, file in plots.items()] + [""]
    lines += ablation_section(grouped, labels) + sweep_section(sweep)
    rows = [
        [r.path, r.method, str(r.config.get("seed", NONE)), f"{r.results.mean_rouge_l:.2f}"]
        for r in runs + sweep
    ]
    lines += ["## Runs", "", *_table(["folder", "method", "seed", "mean ROUGE-L"], rows)]
    return "\n".join(lines).rstrip("\n") + "\n"
