"""The clients' data: the paper's split of the packaged Dolly-15k, fixed test pools, cuts."""

import json
import random

import pytest

from flexmoe.client import client_datasets, truncation_report
from flexmoe.data import load_dolly
from flexmoe.errors import FlexMoEError
from flexmoe.settings import Settings

PAPER = ["classification", "closed_qa", "information_extraction", "summarization"]


def clients_of(settings: Settings) -> tuple:
    return client_datasets(settings.data, settings.federation.clients, settings.seed)


def test_the_default_run_is_the_papers_split_of_the_packaged_dolly():
    clients = clients_of(Settings())
    assert [client.categories for client in clients] == [[c] for c in PAPER]
    assert [len(client.test) for client in clients] == [100] * 4
    assert [len(client.train) for client in clients] == [300] * 4
    for client in clients:
        assert not set(client.test) & set(client.train)


def test_every_seed_and_method_scores_the_same_test_examples():
    first = clients_of(Settings.of(max_train=8))
    other = clients_of(Settings.of(max_train=8, seed=3, method="fedavg"))
    assert [c.test for c in first] == [c.test for c in other]
    assert [c.train for c in first] != [c.train for c in other]


def test_the_upstream_file_in_any_line_order_gives_the_clients_of_the_packaged_copy(tmp_path):
    records = [
        {"instruction": e.instruction, "context": e.input, "response": e.output,
         "category": e.category}
        for e in load_dolly()
    ]  # fmt: skip
    random.Random(7).shuffle(records)
    upstream = tmp_path / "databricks-dolly-15k.jsonl"
    upstream.write_text("".join(json.dumps(r) + "\n" for r in records))
    for split in ("pathological", "dirichlet"):
        packaged = Settings.of(split=split, max_train=16, max_test=20)
        assert clients_of(packaged.updated({"data": str(upstream)})) == clients_of(packaged)


def test_dirichlet_spreads_the_papers_categories_and_a_setting_widens_them():
    (client,) = clients_of(Settings.of(split="dirichlet", clients=1, max_train=10_000))
    assert client.categories == PAPER
    (wide,) = clients_of(Settings.of(split="dirichlet", clients=1, categories="all"))
    assert len(wide.categories) == 8
    chosen = clients_of(Settings.of(clients=2, categories="open_qa, brainstorming"))
    assert [c.categories for c in chosen] == [["brainstorming"], ["open_qa"]]
    with pytest.raises(FlexMoEError, match="categories not in the data: poetry"):
        clients_of(Settings.of(categories="poetry"))


def test_long_inputs_are_cut_to_fit_and_counted_by_category(tmp_path, dolly_file):
    long = [
        {"instruction": "Sum it up.", "context": "word " * 400, "response": "Short.",
         "category": "summarization"},
        {"instruction": "Say it.", "context": "", "response": "yes " * 400, "category": "open"},
    ]  # fmt: skip
    data = tmp_path / "long.jsonl"
    data.write_text(dolly_file.read_text() + "\n" + "\n".join(json.dumps(r) for r in long))
    config = Settings.of(data=str(data), model="tiny", max_length=128, split="iid", clients=1)
    report = truncation_report(config)
    used = {e for c in clients_of(config) for e in c.train + c.test}
    assert sum(r["examples"] for r in report.values()) == len(used) == 42
    assert report["summarization"] == {"examples": 11, "context_cut": 1, "answer_cut": 0}
    assert report["open"] == {"examples": 1, "context_cut": 0, "answer_cut": 1}


def test_a_validation_run_never_evaluates_on_test_examples(tmp_path, monkeypatch, dolly_file):
    monkeypatch.setenv("FLEXMOE_CACHE", str(tmp_path))
    config = Settings.of(data=str(dolly_file), max_length=512, max_test=3)
    tested = clients_of(config)
    validated = clients_of(config.updated({"eval_split": "validation"}))
    for client, tuning in zip(tested, validated, strict=True):
        assert len(tuning.test) == len(client.test) > 0
        assert not set(client.test) & set(tuning.train + tuning.test)
        assert set(tuning.train + tuning.test) <= set(client.train)
