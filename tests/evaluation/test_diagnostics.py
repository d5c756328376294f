"""Knowledge measures kept on disk: measured once per weights, however many processes ask."""

from __future__ import annotations

import threading
import time

from torch import nn

from flexmoe.evaluation.diagnostics import MEASURE_FILE, measured


def test_a_measure_asked_for_twice_at_once_is_measured_once_and_kept(tmp_path):
    model, calls, values = nn.Linear(2, 2), [], []

    def slow_measure(_model, scale):
        calls.append(scale)
        time.sleep(0.5)  # long enough for the second asker to find the first measuring
        return {"perplexity": 2.0 * scale}

    def ask():  # flock treats each open file as its own holder, so threads stand for processes
        values.append(measured(tmp_path, "weights", model, "heldout", slow_measure, dict, 3))

    askers = [threading.Thread(target=ask) for _ in range(2)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert calls == [3] and values == [{"perplexity": 6.0}] * 2
    assert measured(tmp_path, "weights", model, "heldout", slow_measure, dict, 3) == values[0]
    assert calls == [3]  # read back from disk
    kept = list(tmp_path.glob(f"*weights*heldout/{MEASURE_FILE}"))
    assert len(kept) == 1 and not list(tmp_path.glob("**/.lock"))


def test_a_damaged_measure_is_measured_again(tmp_path):
    model = nn.Linear(2, 2)
    measured(tmp_path, "weights", model, "mmlu", lambda _m: {"accuracy": 0.25}, dict)
    (path,) = tmp_path.glob(f"*/{MEASURE_FILE}")
    path.write_text("{not json")
    assert measured(tmp_path, "weights", model, "mmlu", lambda _m: {"accuracy": 0.5}, dict) == {
        "accuracy": 0.5
    }
