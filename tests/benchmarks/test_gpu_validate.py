"""benchmarks/gpu/validate.py in its CPU mode: every step of the GPU check runs and passes."""

import json
import math

import pytest

from benchmarks.gpu import validate


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_a_small_config_on_the_cpu(tmp_path):
    summary = json.loads(validate.main(["--cpu", "--out", str(tmp_path / "v.json")]).read_text())
    steps = summary["steps"]
    assert list(steps) == [
        "build", "graft", "FLEx steps", "FLEx steps, gradient checkpointing",
        "FLEx steps, one example a forward pass", "save, unload, load", "FedAvg steps",
        "FedAvg steps, gradient checkpointing", "FedAvg steps, one example a forward pass",
        "generate one at a time", "generate batched", "client worker round",
    ]  # fmt: skip
    assert steps["graft"]["layers"] == validate.SMALL["num_hidden_layers"]
    assert steps["save, unload, load"]["base_untouched"] is True
    assert steps["save, unload, load"]["personal_state_equal"] is True
    for name in (n for n in steps if " steps" in n):
        first, last = steps[name]["losses"]
        assert last < first, name  # the same batches again: the loss falls
    assert steps["generate batched"]["same_answers_as_one_at_a_time"].endswith("of 8")
    assert math.isfinite(steps["client worker round"]["train_loss"])
    assert summary["mode"] == "cpu" and summary["versions"]["torch"]
