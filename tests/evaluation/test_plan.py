"""`flexmoe plan`: a federation priced from its config alone, checked against real runs."""

import json

import pytest
import torch

from flexmoe.cli import main
from flexmoe.client import ClientWorker
from flexmoe.errors import FlexMoEError
from flexmoe.evaluation.plan import (
    activation_bytes,
    format_plan,
    plan,
    plans_table,
    saved_activation_bytes,
)
from flexmoe.federated.federation import initial_arrays
from flexmoe.federated.protocol import TrainReply
from flexmoe.federated.records import arrays_to_state, wire_bytes
from flexmoe.flex import FlexConfig, FlexModel, GraftSettings
from flexmoe.methods import METHODS, get_method
from flexmoe.models.loading import shipped_configs
from flexmoe.settings import Settings
from flexmoe.training import answer_loss
from tests import ROOT
from tests.tiny_models import ARCHITECTURES, build_model

PLANNED = [get_method(m) for m in ("flex", "fedavg", "fedsa-lora", "fedavg-full")]


def test_the_papers_model_on_paper():
    result = plan("qwen1.5-moe-a2.7b", PLANNED)
    assert result.parameters == pytest.approx(14.3e9, rel=0.01)  # as published
    assert (result.moe_layers, result.experts, result.top_k) == (24, 60, 4)
    assert result.uplink_ratio("flex") <= 0.01
    flex = next(m for m in result.methods if m.method == "flex")
    assert flex.personal > 0 and flex.bytes_up == 4 * flex.shared
    assert flex.memory.weights > 2 * result.parameters  # bfloat16 base, float32 adapters
    assert 0 < flex.memory.activations_checkpointed < flex.memory.activations
    assert 1 < result.flops_ratio < 1.25
    full = plan("qwen1.5-moe-a2.7b", [get_method("fedavg-full")])
    (memory,) = (m.memory for m in full.methods)  # trained in float32, as the clients hold it
    assert (memory.weights, memory.gradients) == (4 * full.parameters, 4 * full.parameters)
    assert memory.optimizer == 2 * memory.gradients


def test_the_token_budget_bounds_grafting_on_the_papers_model():
    budgeted = plan("qwen1.5-moe-a2.7b", PLANNED[:1])
    everything = plan(
        "qwen1.5-moe-a2.7b", PLANNED[:1], graft=GraftSettings(selection_token_budget=0)
    )
    assert budgeted.grafting_forwards <= 2 < everything.grafting_forwards
    # 60 experts scored where a forward runs 4 routed and a shared expert: about 6.5 forwards
    assert everything.grafting_forwards - 1 == pytest.approx(
        (budgeted.grafting_forwards - 1) * 64 * 512 / 4096
    )
    every_example = plan(
        "qwen1.5-moe-a2.7b", PLANNED[:1], graft=GraftSettings(selection_examples=0)
    )
    assert every_example.grafting_forwards is None  # a budget's share shrinks as data grows
    line = "every training example, scoring 4096 tokens per layer: a forward over them plus"
    assert line in format_plan(every_example)


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_builds_and_plans(name):
    result = plan(name, [get_method("flex"), get_method("fedavg-full")])
    assert result.uplink_ratio("flex") < 0.01
    assert result.methods[0].memory.total > 0


def test_the_planned_uplink_is_what_a_client_sends(tmp_path, random_model, dolly_file):
    config = Settings.of(
        model=str(random_model), data=str(dolly_file), clients=2, rounds=1, local_steps=1,
        batch_size=4, max_length=512, device="cpu",
    )  # fmt: skip
    worker = ClientWorker(config, 0, tmp_path)
    shared = arrays_to_state(initial_arrays(config, get_method("flex")))
    result = worker.train(1, shared)
    reply = TrainReply(
        0, result.num_examples, result.train_loss, result.lr, 0.0, shared=result.shared
    )
    planned = plan(str(random_model), [get_method("flex")], torch.float32).methods[0]
    assert planned.shared == sum(t.numel() for t in result.shared.values())
    framing = wire_bytes(reply.to_content()) - planned.bytes_up  # names, shapes, metrics
    assert 0 < framing < 300 * len(result.shared)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize(("method", "low"), [("flex", 0.8), ("fedavg", 0.8), ("fedavg-full", 0.7)])
def test_the_activation_estimate_is_near_what_autograd_saves(model_type, method, low):
    shared = METHODS[method].shared
    base = build_model(model_type)
    ids = torch.randint(2, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(64) < 48, -100)  # answers: the last quarter
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    config = FlexConfig(shared=shared)
    graft = METHODS[method].grafts
    flex = FlexModel.graft(base, [batch], config)[0] if graft else FlexModel(base, config=config)
    flex.model.train()
    measured = saved_activation_bytes(flex.model, lambda: answer_loss(flex.model, batch))
    estimated = activation_bytes(flex, ids.numel(), int(graft))
    assert low <= estimated / measured <= 1.2


def test_flexmoe_plan_prints_roles_traffic_and_memory(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert (
        main(["plan", "--model", "qwen1.5-moe-a2.7b", "--method", "flex", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "14.3B parameters in bfloat16; 24 MoE layers of 60 experts, top-4" in text
    assert "5 experts per token" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert float(rows["flex"][5]) <= 0.01 and rows["fedavg-full"][5] == "1.00e+00"
    assert out.is_file()


def test_a_plan_in_micro_batches_holds_one_forwards_activations(tmp_path):
    plans = []
    for extra in ([], ["--micro-batch-size", "1"]):
        out = tmp_path / f"plan{len(extra)}.json"
        argv = ["plan", "--model", "olmoe-1b-7b", "--batch-size", "4", "--out", str(out), *extra]
        assert main(argv) == 0
        plans.append(json.loads(out.read_text()))
    whole, in_parts = plans
    assert (whole["examples_per_forward"], in_parts["examples_per_forward"]) == (4, 1)
    activations = [plan["methods"][0]["memory"]["activations"] for plan in plans]
    assert activations[1] == pytest.approx(activations[0] / 4, rel=0.01)


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--model", "/no/such/config.json"], "neither a model folder"),
        (["--model", "qwen1.5-moe-a2.7b", "--method", "fedsgd"], "unknown method 'fedsgd'"),
        (["--model", "qwen1.5-moe-a2.7b", "--seq-len", "0"], "--seq-len must be at least 1"),
    ],
)
def test_bad_plans_fail_in_one_line(capsys, argv, phrase):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_the_readme_table_is_the_plans_of_the_shipped_configs():
    names = ["qwen1.5-moe-a2.7b", "olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3"]
    assert sorted(names) == sorted(shipped_configs())
    plans = [plan(name, [get_method("flex"), get_method("fedavg-full")]) for name in names]
    assert plans_table(plans) in (ROOT / "docs" / "models.md").read_text()


def test_the_server_starts_lora_from_the_config_alone(tmp_path, random_model):
    import shutil

    from flexmoe.flex.model import initial_shared_state
    from flexmoe.flex.sharing import SharedConfig
    from flexmoe.models.loading import load_model

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(random_model / "config.json", config_only)  # no weights, no tokenizer
    state = initial_shared_state(str(config_only), SharedConfig())
    real = FlexModel(load_model(random_model)[0]).shared_state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in real.items()}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    a_bound = max(v.abs().max() for k, v in state.items() if ".lora_A." in k)
    assert 0 < a_bound <= 1 / 32**0.5  # PEFT's uniform start: 1/sqrt(fan-in), hidden 32
    assert all(not v.any() for k, v in state.items() if ".lora_B." in k)
    with pytest.raises(FlexMoEError, match="cannot load a causal LM"):  # full FL needs weights
        initial_shared_state(str(config_only), SharedConfig(mode="all"))
