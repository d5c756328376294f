"""What the untrained base model scores on the benchmark's clients: where every method starts.

    python benchmarks/smol_moe/base_scores.py [--out benchmarks/results/smol-moe/base.json]

For each split and seed of the Natural Instructions smol-moe benchmark (the sizes of ``CELL``, as
its cells in benchmarks/results/smol-moe were run; not yet the Dolly benchmark's), every client's
ROUGE-L on its own test split, computed by the clients' own evaluation code on the pretrained model
with an untrained shared LoRA (its B matrices are zero, so it computes the base model exactly).
A split and seed already in the file are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from flexmoe.client.worker import ClientWorker
from flexmoe.flex.model import initial_shared_state
from flexmoe.io import atomic_write_text
from flexmoe.settings import Settings

OUT = Path(__file__).resolve().parents[1] / "results" / "smol-moe" / "base.json"
CELL = {  # the benchmark's cell size (docs/results.md: "Results on smol-moe")
    "model": "smol-moe",
    "batch_size": 4,
    "max_train": 32,
    "max_test": 16,
    "max_new_tokens": 32,
    "method": "fedavg",
}
SPLITS = {
    "pathological": ({"split": "pathological", "clients": 4}, (0, 1, 2)),
    "dirichlet-1.0": ({"split": "dirichlet", "alpha": 1.0, "clients": 10, "max_test": 8}, (0, 1)),
}


def base_scores(config: Settings) -> list[float]:
    """Each client's ROUGE-L of the base model on its test split."""
    shared = initial_shared_state(config.model, config.chosen_method().shared)
    scores = []
    with tempfile.TemporaryDirectory() as scratch:
        for client in range(config.federation.clients):
            worker = ClientWorker(config, client, Path(scratch) / f"client-{client}")
            scores.append(worker.evaluate(0, shared).rouge_l)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    found = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name, (settings, seeds) in SPLITS.items():
        for seed in seeds:
            key = f"{name}/seed{seed}"
            if key in found:
                continue
            config = Settings().updated({**CELL, **settings, "seed": seed})
            clients = base_scores(config)
            found[key] = {"clients": clients, "mean_rouge_l": statistics.fmean(clients)}
            atomic_write_text(args.out, json.dumps(found, indent=1) + "\n")
            print(f"{key}: mean ROUGE-L {found[key]['mean_rouge_l']:.2f}", flush=True)


if __name__ == "__main__":
    main()
