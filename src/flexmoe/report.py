"""Human-readable summaries of results."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flexmoe.runconfig import RunConfig


def results_table(results: dict) -> str:
    """A per-client table of one run's results, with totals."""
    header = f"{'client':>6}  {'categories':<40} {'train':>6} {'test':>5} {'ROUGE-L':>8}"
    lines = [
        f"method {results['method']}, split {results['split']}, seed {results['seed']}, "
        f"{results['rounds']} rounds",
        header,
        "-" * len(header),
    ]
    for client in results["clients"]:
        categories = ", ".join(client["categories"])[:40]
        lines.append(
            f"{client['client_id']:>6}  {categories:<40} {client['n_train']:>6} "
            f"{client['n_test']:>5} {client['rouge_l']:>8.2f}"
        )
    comm = results["comm"]
    lines += [
        "-" * len(header),
        f"mean ROUGE-L {results['mean_rouge_l']:.2f}   uplink {_megabytes(comm['bytes_up'])}   "
        f"downlink {_megabytes(comm['bytes_down'])}   wall {results['wall_s']:.0f} s",
    ]
    return "\n".join(lines)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB"


# --- benchmark reports: every results.json under a folder, as report.md and plots ---

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
RESULTS_NAME = "results.json"
ROUNDS_NAME = "rounds.json"
REFERENCE = "fedavg-full"  # traffic is compared with naive dense FL
FLEX = "flex"
ABLATION_FIELDS = ("experts_per_layer", "size_ratio", "gate_bias", "clients")
RUN_FIELDS = ("method", "seed")  # what differs between runs of one setting's tables
NONE = "-"
REQUIRED = ("method", "clients", "mean_rouge_l", "comm")


@dataclass(frozen=True)
class Run:
    """One finished run: its results.json, its rounds.json if any, and where it lies."""

    path: str  # the folder, relative to the report's folder
    results: dict
    rounds: list[dict] | None

    @property
    def method(self) -> str:
        return self.results["method"]

    @property
    def config(self) -> dict:
        """The run's settings; a setting newer than the run reads as its default."""
        top = {k: self.results[k] for k in ("split", "alpha", "seed") if k in self.results}
        saved = self.results.get("config")
        defaults = asdict(RunConfig()) if saved else {}
        return {**defaults, **top, "method": self.method, **(saved or {})}

    def setting(self) -> Setting:
        return tuple(sorted((k, v) for k, v in self.config.items() if k not in RUN_FIELDS))


Setting = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Summary:
    """Mean and spread over the runs (seeds) of one method in one setting."""

    runs: tuple[Run, ...]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def rouge(self) -> float:
        return statistics.fmean(r.results["mean_rouge_l"] for r in self.runs)

    @property
    def rouge_std(self) -> float | None:
        """Sample standard deviation of mean ROUGE-L over runs; None below two runs."""
        values = [r.results["mean_rouge_l"] for r in self.runs]
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def ppl_increase(self) -> float | None:
        return _mean_or_none(r.results.get("mean_ppl_increase") for r in self.runs)

    def traffic(self, key: str) -> float:
        """Mean bytes per run, ``bytes_up`` or ``bytes_down``."""
        return statistics.fmean(r.results["comm"][key] for r in self.runs)

    def clients(self) -> list[dict]:
        """Every client record of every run."""
        return [client for run in self.runs for client in run.results["clients"]]

    @property
    def flops_ratio(self) -> float | None:
        return _mean_or_none(r.results.get("flops_ratio") for r in self.runs)

    def client_rouge(self) -> dict[int, float]:
        """Each client's ROUGE-L, mean over the runs that evaluated it."""
        scores: dict[int, list[float]] = {}
        for run in self.runs:
            for client in run.results["clients"]:
                scores.setdefault(client["client_id"], []).append(client["rouge_l"])
        return {cid: statistics.fmean(values) for cid, values in sorted(scores.items())}


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def load_runs(directory: Path) -> list[Run]:
    """Every results.json under ``directory``, in the order of their paths."""
    runs = []
    for path in sorted(
        directory.rglob(RESULTS_NAME), key=lambda p: p.relative_to(directory).as_posix()
    ):
        rounds_file = path.with_name(ROUNDS_NAME)
        rounds = json.loads(rounds_file.read_text()) if rounds_file.is_file() else None
        folder = path.parent.relative_to(directory).as_posix()
        runs.append(Run(folder, _results(path), rounds))
    return runs


def _results(path: Path) -> dict:
    """A results.json with the fields the report needs, or an error naming the file."""
    from flexmoe.errors import FlexMoEError
    from flexmoe.io import read_json

    results = read_json(path, "give a folder of 'flexmoe run' outputs")
    missing = [key for key in REQUIRED if key not in results]
    if missing:
        raise FlexMoEError(f"{str(path)!r} is not a flexmoe results file (no {', '.join(missing)})")
    return results


def method_order(names: Iterable[str]) -> list[str]:
    """Methods in the order of the METHODS table, unknown ones after it alphabetically."""
    from flexmoe.methods import METHODS

    known = list(METHODS)
    return sorted(set(names), key=lambda m: (known.index(m) if m in known else len(known), m))


def split_label(config: dict) -> str:
    split = config.get("split", "?")
    return f"dirichlet-{float(config['alpha'])}" if split == "dirichlet" else split


def setting_labels(settings: Iterable[Setting]) -> dict[Setting, str]:
    """A short unique name per setting: its split, then what varies between settings of it."""
    by_split: dict[str, list[dict]] = {}
    for setting in settings:
        by_split.setdefault(split_label(dict(setting)), []).append(dict(setting))
    labels = {}
    for split, configs in by_split.items():
        varied = _varied_fields(configs)
        for config in configs:
            parts = [split, *(f"{_kebab(f)} {config.get(f)}" for f in varied)]
            labels[tuple(sorted(config.items()))] = ", ".join(parts)
    return labels


def _varied_fields(configs: list[dict]) -> list[str]:
    names = sorted({name for config in configs for name in config})
    return [n for n in names if len({repr(c.get(n)) for c in configs}) > 1]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _setting_order(setting: Setting) -> tuple:
    config = dict(setting)
    numbers = tuple((k, v) for k, v in setting if isinstance(v, int | float))
    return (
        config.get("split") != "pathological",
        -float(config.get("alpha", 0)),
        numbers,
        repr(setting),
    )


def group_runs(runs: Iterable[Run]) -> dict[Setting, dict[str, Summary]]:
    """Runs by setting, then by method, settings and methods in report order."""
    grouped: dict[Setting, dict[str, list[Run]]] = {}
    for run in runs:
        grouped.setdefault(run.setting(), {}).setdefault(run.method, []).append(run)
    return {
        setting: {m: Summary(tuple(grouped[setting][m])) for m in method_order(grouped[setting])}
        for setting in sorted(grouped, key=_setting_order)
    }


# --- report.md ---


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
        for client in run.results["clients"]:
            seen.setdefault(client["client_id"], set()).add(tuple(client.get("categories", ())))
    return {
        cid: _categories(next(iter(s))) if len(s) == 1 else "varies by seed"
        for cid, s in seen.items()
    }


def _categories(names: Sequence[str], shown: int = 3) -> str:
    text = ", ".join(names[:shown])
    return text + (f" +{len(names) - shown} more" if len(names) > shown else "")


def _measured(summaries: dict[str, Summary], key: str) -> dict[str, list[dict]]:
    """Per method, the ``key`` record of every client that has one; methods without any left out."""
    found = {m: [c[key] for c in s.clients() if key in c] for m, s in summaries.items()}
    return {m: records for m, records in found.items() if records}


def knowledge_table(summaries: dict[str, Summary]) -> list[str]:
    """Held-out perplexity per pretraining domain, base model and each method's final models."""
    measured = _measured(summaries, "knowledge")
    if not measured:
        return []
    first = next(iter(measured.values()))

    def mean_ppl(records: list[dict], stage: str, domain: str) -> str:
        return _number(statistics.fmean(r[stage][domain] for r in records))

    rows = [
        [domain, mean_ppl(first, "heldout_ppl_base", domain),
         *(mean_ppl(records, "heldout_ppl", domain) for records in measured.values())]
        for domain in sorted(first[0]["heldout_ppl_base"])
    ]  # fmt: skip
    title = "Held-out perplexity per pretraining domain (mean over clients and seeds):"
    return [title, "", *_table(["domain", "base model", *measured], rows)]


def routing_summary(routed: list[dict]) -> dict[str, float | None]:
    """Entropies before and after, and the grafted gates' mean, over clients, layers and seeds."""

    def mean_of(stage: str, key: str) -> float:
        return statistics.fmean(layer[key] for r in routed for layer in r[stage]["layers"])

    gates = [g for r in routed for layer in r["final"]["layers"] for g in layer["gate_means"]]
    entropies = {
        f"{key}_{stage}": mean_of(stage, key)
        for key in ("utilisation_entropy", "token_entropy")
        for stage in ("base", "final")
    }
    return {**entropies, "gate": _mean_or_none(gates)}


def layer_shifts(routed: list[dict]) -> dict[int, list[float]]:
    """Per MoE layer, every client's total-variation distance of utilisation, base to final."""
    from flexmoe.evaluation.routing import utilisation_shift

    shifts: dict[int, list[float]] = {}
    for record in routed:
        for shift in utilisation_shift(record["base"], record["final"]):
            shifts.setdefault(shift["layer"], []).append(shift["total_variation"])
    return dict(sorted(shifts.items()))


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


def ablation_families(
    grouped: dict[Setting, dict[str, Summary]],
) -> list[tuple[str, list[Setting]]]:
    """Sets of settings that differ in one ablated field only, with at least two of its values."""
    families = []
    for name in ABLATION_FIELDS:
        by_rest: dict[Setting, list[Setting]] = {}
        for setting in grouped:
            rest = tuple((k, v) for k, v in setting if k != name)
            by_rest.setdefault(rest, []).append(setting)
        for members in by_rest.values():
            if len(members) > 1:
                families.append((name, sorted(members, key=lambda s: dict(s)[name])))
    return families


def ablation_section(
    grouped: dict[Setting, dict[str, Summary]], labels: dict[Setting, str]
) -> list[str]:
    lines = []
    for name, members in ablation_families(grouped):
        lines += [f"### {_kebab(name)} ({_family_label(labels[members[0]], name)})", ""]
        rows = [
            [str(dict(s)[name]), m, str(x.n), f"{x.rouge:.2f}", _number(x.rouge_std),
             _percent(x.ppl_increase), _number(x.flops_ratio, ".3f"),
             _megabytes_cell(x.traffic("bytes_up"))]
            for s in members
            for m, x in grouped[s].items()
        ]  # fmt: skip
        header = [_kebab(name), "method", "seeds", "mean ROUGE-L", "std", "held-out ppl increase"]
        lines += _table([*header, "MoE FLOPs ratio", "MB up / run"], rows)
        lines += [f"![{name}]({PLOTS_DIR}/{ablation_plot(labels[members[0]], name)})", ""]
    return ["## Ablations", "", *lines] if lines else []


def _family_label(label: str, name: str) -> str:
    """A setting's label without the ablated field."""
    return ", ".join(p for p in label.split(", ") if not p.startswith(f"{_kebab(name)} "))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text.replace(", ", "-"))


def ablation_plot(label: str, name: str) -> str:
    return f"ablation-{_kebab(name)}-{_slug(_family_label(label, name))}.png"


def setting_plots(label: str) -> dict[str, str]:
    """The plot files of one setting, by kind."""
    slug = _slug(label)
    return {kind: f"{slug}-{kind}.png" for kind in ("curves", "clients", "quality-vs-uplink")}


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
        [r.path, r.method, str(r.config.get("seed", NONE)), f"{r.results['mean_rouge_l']:.2f}"]
        for r in runs
    ]
    lines += ["## Runs", "", *_table(["folder", "method", "seed", "mean ROUGE-L"], rows)]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(directory: str | Path) -> Path:
    """Write ``directory``/report.md and its plots from every results.json under it."""
    from flexmoe.errors import FlexMoEError
    from flexmoe.io import atomic_write_text

    directory = Path(directory)
    runs = load_runs(directory)
    if not runs:
        raise FlexMoEError(f"no {RESULTS_NAME} under {str(directory)!r}; run 'flexmoe bench' first")
    from flexmoe.plots import write_plots

    write_plots(runs, directory / PLOTS_DIR)
    return atomic_write_text(directory / REPORT_FILE, render_report(runs))
