"""Shared fixtures: tiny random MoE models of every tested architecture, saved as real folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tests.tiny_models import ARCHITECTURES, COMMON, TEXTS, make_tokenizer, save_model

torch.set_num_threads(1)  # tiny tensors: threads only add contention on a 2-core machine


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(TEXTS * 10)


@pytest.fixture(scope="session", params=sorted(ARCHITECTURES))
def model_dir(request, tmp_path_factory) -> Path:
    """A saved tiny model of each architecture."""
    return save_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def olmoe_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("olmoe"), "olmoe")


@pytest.fixture(scope="session")
def dense_model_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    config = AutoConfig.for_model("llama", **{**COMMON, "intermediate_size": 32})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    records = [
        {"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
        for w in ("apple", "river", "stone", "cloud", "green", "quiet")
    ]
    records.append({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


CATEGORIES = ("closed_qa", "classification", "summarization", "brainstorming")


@pytest.fixture(scope="session")
def dolly_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "dolly.jsonl"
    rows = [
        {
            "instruction": f"Say the word number {i}.",
            "context": "" if i % 2 else "Words are short.",
            "response": f"word {i}",
            "category": category,
        }
        for category in CATEGORIES
        for i in range(10)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="session")
def random_model(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model"), "qwen2_moe")


@pytest.fixture
def task_identity(monkeypatch):
    """Messages are stamped with the process's run and node, which a Flower runtime would set."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
