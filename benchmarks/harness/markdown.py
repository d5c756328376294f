"""report.md: a benchmark folder's runs as Markdown tables, a function of their JSON alone."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from benchmarks.harness.claims import (
    FLEX,
    KNOWLEDGE,
    REFERENCE,
    ROUGE,
    Comparison,
    Measure,
    compare,
    federated_baseline,
    flex_arms,
    personalises,
)
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
from flexmoe.results import Knowledge, MMLUScore
from flexmoe.schema import kebab

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
    """Which arm has the best mean ROUGE-L, and where FLEx stands when it is not it."""
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


PAIRED = (
    "Paired comparisons: the mean difference (first minus second) over what both measured on "
    "the same test examples (ROUGE-L) or held-out domains (perplexity increase of each "
    "client's model) in the same seeds; its interval is a hierarchical bootstrap (seeds, then "
    "each client's examples or domains), at the level of Holm's step-down across the "
    "comparisons of one family (one FLEx arm against the other arms by one measure), and a "
    "verdict names a difference only when that interval excludes zero."
)


def claims_section(summaries: dict[str, Summary]) -> list[str]:
    """Each FLEx arm against every other arm by paired comparisons, and the paper's claims."""
    candidates = flex_arms(summaries)
    others = [m for m in summaries if summaries[m].method != FLEX]
    if not candidates or not others:
        return []
    lines, rows = [PAIRED, ""], []
    for arm in candidates:
        rouge = compare(arm, others, summaries, ROUGE)
        kept = [m for m in others if personalises(summaries[m].method)]
        knowledge = compare(arm, kept, summaries, KNOWLEDGE) if kept else {}
        rows += _comparison_rows(arm, rouge, ROUGE) + _comparison_rows(arm, knowledge, KNOWLEDGE)
        claims = [
            _rouge_claim(arm, rouge, summaries),
            _every_method_claim(arm, rouge),
            _knowledge_claim(arm, knowledge),
            traffic_claim(summaries, arm),
        ]
        lines += [f"The paper's claims for {arm}:", ""]
        lines += [f"- {claim}" for claim in claims if claim] + [""]
    variants = [m for m in candidates if m != FLEX]
    if FLEX in candidates and variants:
        for measure in (ROUGE, KNOWLEDGE):
            found = compare(FLEX, variants, summaries, measure)
            rows += _comparison_rows(FLEX, found, measure)
    if not rows:
        return lines
    header = ["first", "second", "measure", "seeds", "pairs", "difference", "interval", "p",
              "verdict"]  # fmt: skip
    return [*lines, *_table(header, rows)]


def _comparison_rows(arm: str, found: dict[str, Comparison], measure: Measure) -> list[list[str]]:
    """A row per comparison that could be paired (the claims name the others)."""
    rows = []
    for rival, comparison in found.items():
        verdict = comparison.verdict
        if verdict is None:
            continue
        difference = verdict.difference
        rows.append([
            arm, rival, measure.name, str(difference.seeds), str(difference.examples),
            f"{difference.mean:+.2f}", f"[{verdict.low:+.2f}, {verdict.high:+.2f}] at "
            f"{100 * verdict.level:.3g}%", f"{difference.p_value:.3g}",
            _favour_word(comparison.favours(measure.higher_is_better), arm, measure),
        ])  # fmt: skip
    return rows


def _favour_word(favours: bool | None, arm: str, measure: Measure) -> str:
    if favours is None:
        return "no difference shown"
    better = "loses less" if measure is KNOWLEDGE else "better"
    worse = "loses more" if measure is KNOWLEDGE else "worse"
    return f"{arm} {better if favours else worse}"


def _judged(found: dict[str, Comparison], higher_is_better: bool) -> str:
    """``supported`` when the arm is better than every rival in ``found``, else which not."""
    untested = [m for m, c in found.items() if c.verdict is None]
    outcome = {m: c.favours(higher_is_better) for m, c in found.items() if c.verdict}
    worse = [m for m, better in outcome.items() if better is False]
    tied = [m for m, better in outcome.items() if better is None]
    if untested and not outcome:
        reasons = sorted({found[m].problem for m in untested})
        return f"untested (not paired: {'; '.join(reasons)})"
    if not worse and not tied and not untested:
        return "supported"
    parts = [
        f"{text} {', '.join(names)}"
        for text, names in (("worse than", worse), ("no difference shown against", tied),
                            ("not paired with", untested))
        if names
    ]  # fmt: skip
    return f"not supported ({'; '.join(parts)})"


def _rouge_claim(arm: str, found: dict[str, Comparison], summaries: dict[str, Summary]) -> str:
    baselines = {m: c for m, c in found.items() if federated_baseline(summaries[m].method)}
    if not baselines:
        return ""
    return (
        f"Better ROUGE-L than the federated baselines ({', '.join(baselines)}): "
        f"{_judged(baselines, True)}."
    )


def _every_method_claim(arm: str, found: dict[str, Comparison]) -> str:
    return f"Better ROUGE-L than every other method ({', '.join(found)}): {_judged(found, True)}."


def _knowledge_claim(arm: str, found: dict[str, Comparison]) -> str:
    if not found:
        return ""
    return (
        "Least knowledge lost (held-out perplexity increase) among the methods that "
        f"personalise ({', '.join(found)}): {_judged(found, False)}."
    )


def traffic_claim(summaries: dict[str, Summary], arm: str = FLEX) -> str | None:
    """Claim 3: far less traffic, taken as under 1% of fedavg-full's uplink."""
    if REFERENCE not in summaries:
        return None
    flex, full = (summaries[m].traffic("bytes_up") for m in (arm, REFERENCE))
    if full == 0:
        return f"Under 1% of {REFERENCE}'s uplink: untested ({REFERENCE}'s runs sent nothing)."
    ratio = flex / full
    verdict = "supported" if ratio < 0.01 else "not supported"
    return (
        f"Under 1% of {REFERENCE}'s uplink: {verdict}. {arm} sends {ratio:.2%} of it "
        f"({_megabytes_cell(flex)} MB against {_megabytes_cell(full)} MB per run)."
    )


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
        "test split is never seen). A grid is widened by a half-decade while its best value is at "
        f"an end, up to {MAX_WIDENINGS} times unless the sweep allowed fewer "
        "(`--max-widenings`); a choice still at an end is marked. Methods not listed take the "
        "choice of the method they train as (FLEx's ablations FLEx's, FedAvg's server-side "
        "variants FedAvg's learning rate).",
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
        [r.path, r.method, str(r.config.get("seed", NONE)), f"{r.results.mean_rouge_l:.2f}",
         ", ".join(r.commits) or NONE]
        for r in runs + sweep
    ]  # fmt: skip
    header = ["folder", "method", "seed", "mean ROUGE-L", "commit"]
    lines += ["## Runs", "", "Each run's commit, per start (a resumed run has several; '*': "
              "the code had uncommitted changes):", "", *_table(header, rows)]  # fmt: skip
    return "\n".join(lines).rstrip("\n") + "\n"
