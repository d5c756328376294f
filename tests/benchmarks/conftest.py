"""Fixtures of the benchmark harness's tests."""

from pathlib import Path

import pytest

from tests.benchmarks.fakes import SCORES, fake_results, train_losses, write_run


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
