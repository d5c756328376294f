"""FLEx on smol-moe with small settings: time per round, grafting losses, experts per client.

    python benchmarks/smol_moe/flex_run.py [--out benchmarks/results/smol_moe/flex-run]

Runs ``flexmoe run --model smol-moe`` (resuming it if an earlier try was interrupted, skipping
it if it finished), then summarises from its ``results.json`` and ``rounds.json``: the wall time
of every round, the grafting criterion's loss ``L({e})`` per layer (the chosen expert's against
the median expert's), and how often two clients graft the same expert in a layer, against the
1/E that clients choosing at random would share. Writes ``OUT/summary.json`` and prints it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

from flexmoe.results import CHECKPOINT_FILE, RESULTS_FILE, ROUNDS_FILE, read_results, read_rounds

OUT = Path(__file__).resolve().parents[1] / "results" / "smol_moe" / "flex-run"
SETTINGS = [
    "--model", "smol-moe", "--method", "flex", "--clients", "4", "--rounds", "3",
    "--local-steps", "4", "--batch-size", "4", "--max-train", "64", "--max-test", "8",
    "--max-new-tokens", "24", "--seed", "0",
]  # fmt: skip


def run(out: Path) -> None:
    if (out / RESULTS_FILE).is_file():
        return
    where = ["--resume", str(out)] if (out / CHECKPOINT_FILE).is_file() else ["--out", str(out)]
    command = [sys.executable, "-m", "flexmoe", "run", *where]
    if where[0] == "--out":
        command += SETTINGS
    subprocess.run(command, check=True)


def summarise(out: Path) -> dict:
    results = read_results(out / RESULTS_FILE)
    rounds = read_rounds(out / ROUNDS_FILE)
    clients = results.clients
    layers = sorted(clients[0].graft_losses, key=int)
    per_layer = []
    for layer in layers:
        chosen = [c.grafted_experts[layer][0] for c in clients]
        losses = [c.graft_losses[layer] for c in clients]
        chosen_loss = [loss[e] for loss, e in zip(losses, chosen, strict=True)]
        median_loss = [statistics.median(loss) for loss in losses]
        per_layer.append(
            {
                "layer": int(layer),
                "chosen": chosen,
                "chosen_loss": chosen_loss,
                "median_loss": median_loss,
                "chosen_over_median": statistics.fmean(
                    c / m for c, m in zip(chosen_loss, median_loss, strict=True)
                ),
                "distinct_choices": len(set(chosen)),
            }
        )
    experts = len(clients[0].graft_losses[layers[0]])
    pairs = list(itertools.combinations(range(len(clients)), 2))
    agreement = statistics.fmean(
        clients[a].grafted_experts[layer] == clients[b].grafted_experts[layer]
        for layer in layers
        for a, b in pairs
    )
    return {
        "settings": SETTINGS,
        "round_wall_s": [r.wall_s for r in rounds],
        "final_evaluation_s": round(results.wall_s - sum(r.wall_s for r in rounds), 1),
        "run_wall_s": results.wall_s,
        "mean_rouge_l": results.mean_rouge_l,
        "rouge_l": {c.client_id: c.rouge_l for c in clients},
        "categories": {c.client_id: c.categories for c in clients},
        "mean_ppl_increase": results.mean_ppl_increase,
        "bytes_up": results.comm.bytes_up,
        "same_expert_share": agreement,
        "same_expert_share_by_chance": 1 / experts,
        "layers_where_all_clients_differ": sum(
            layer["distinct_choices"] == len(clients) for layer in per_layer
        ),
        "layers": per_layer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    run(args.out)
    summary = summarise(args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "layers"}, indent=1))


if __name__ == "__main__":
    main()
