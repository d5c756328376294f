"""The server's checks of client updates, and robust aggregation, on real Flower messages."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from flexmoe.errors import FlexMoEError
from flexmoe.federated.aggregation import RoundUpdates
from flexmoe.federated.federation import aggregate, check_enough
from flexmoe.federated.protocol import ARRAYS, NUM_EXAMPLES, TrainReply
from flexmoe.federated.strategies import averages, make_strategy
from flexmoe.settings import Settings

pytestmark = pytest.mark.usefixtures("task_identity")
GLOBAL = {"q.lora_A": np.zeros((2, 3), np.float32), "q.lora_B": np.zeros((3, 2), np.float32)}


def update(client: int, value: float = 1.0, examples: int = 10, **changes) -> Message:
    """A train reply of ``client`` whose every parameter is ``value``, as a client sends it."""
    state = {k: torch.full(a.shape, value) for k, a in GLOBAL.items()}
    state.update(changes)
    reply = TrainReply(client, examples, train_loss=1.0, lr=1e-3, proximal_mu=0.0, shared=state)
    request = Message(RecordDict(), dst_node_id=client + 1, message_type="train")
    return Message(reply.to_content(), reply_to=request)


class Connected:
    """The one part of a Grid that a strategy's node sampling reads."""

    def __init__(self, nodes: int):
        self.node_ids = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def current() -> ArrayRecord:
    return ArrayRecord({k: Array(a) for k, a in GLOBAL.items()})


def received(replies: list[Message], keep_all: bool = False) -> RoundUpdates:
    """``replies`` taken in as they would arrive (300 examples at most a client)."""
    updates = RoundUpdates(current(), 300, {r.metadata.src_node_id: 0 for r in replies}, keep_all)
    for reply in replies:
        updates.add(reply)
    return updates


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"examples": 10**9}, "claims 1000000000 training examples"),
        ({"examples": 0}, "claims 0 training examples"),
        ({"value": float("nan")}, "non-finite values in 'q.lora_A'"),
        ({"k.lora_A": torch.zeros(2, 3)}, "1 unknown"),
        ({"q.lora_A": torch.zeros(3, 3)}, "'q.lora_A' as float32 (3, 3)"),
    ],
)
def test_an_update_unlike_the_global_parameters_is_rejected_with_its_reason(bad, reason):
    good = update(0)
    updates = received([good, update(1, **bad)], keep_all=True)
    assert updates.kept == [good] and updates.accepted == 1
    rejected = updates.rejected
    assert [r.client_id for r in rejected] == [1] and reason in rejected[0].reason


def test_a_float_example_count_another_dtype_or_unreadable_metrics_are_rejected():
    count, dtype, unreadable = update(1), update(2), update(3)
    count.content.metric_records["metrics"][NUM_EXAMPLES] = 10.5
    dtype.content.array_records["arrays"]["q.lora_B"] = Array(np.zeros((3, 2)))
    del unreadable.content.metric_records["metrics"]["client-id"]
    rejected = received([count, dtype, unreadable]).rejected
    assert "claims 10.5" in rejected[0].reason
    assert rejected[2].client_id == -1 and "client-id" in rejected[2].reason
    assert "'q.lora_B' as float64 (3, 2); the global parameter is float32" in rejected[1].reason


def test_the_round_goes_on_without_rejected_updates_when_enough_remain():
    replies = [update(0, 1.0), update(1, 3.0), update(2, float("inf"))]
    config = Settings.of(clients=3, min_updates=2, max_train=300)
    updates = received(replies)
    check_enough(1, updates, config)
    arrays = aggregate(make_strategy(config), 1, updates.for_strategy())
    assert np.allclose(arrays["q.lora_A"].numpy(), 2.0)  # the mean of the two valid ones
    assert [r.client_id for r in updates.rejected] == [2]
    every = Settings.of(clients=3, max_train=300)  # min-updates 0: every reply must be valid
    with pytest.raises(FlexMoEError, match=r"2 of 3 updates are valid.*client 2: holds non-finite"):
        check_enough(1, updates, every)


@pytest.mark.parametrize(("aggregation", "expected"), [("median", 2.0), ("trimmed-mean", 2.5)])
def test_robust_aggregation_resists_an_outlying_update(aggregation, expected):
    values = [1.0, 2.0, 3.0, 1000.0] if aggregation == "trimmed-mean" else [1.0, 2.0, 1000.0]
    replies = [update(i, v) for i, v in enumerate(values)]
    config = Settings.of(clients=len(values), aggregation=aggregation, trim_fraction=0.25)
    strategy = make_strategy(config)
    assert not averages(strategy)  # it needs every update at once
    arrays = aggregate(strategy, 1, received(replies, keep_all=True).for_strategy())
    assert np.allclose(arrays["q.lora_B"].numpy(), expected)


def test_robust_aggregation_is_refused_for_server_optimisers():
    with pytest.raises(FlexMoEError, match="fedadam aggregates with its own server optimiser"):
        make_strategy(Settings.of(method="fedadam", aggregation="median"))


@pytest.mark.parametrize("method", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_a_server_optimisers_aggregate_keeps_the_wire_dtype_so_the_next_round_is_accepted(method):
    config = Settings.of(method=method, clients=2, max_train=300, server_lr=0.1)
    strategy = make_strategy(config)
    list(strategy.configure_train(1, current(), ConfigRecord(), Connected(2)))
    arrays = aggregate(strategy, 1, received([update(0, 1.0), update(1, 3.0)]).for_strategy())
    assert {a.dtype for a in arrays.values()} == {"float32"}
    assert not np.allclose(arrays["q.lora_A"].numpy(), 0.0)  # the server stepped
    second = RoundUpdates(arrays, 300, {1: 0, 2: 0}, keep_all=False)
    for reply in [update(0, 2.0), update(1, 2.0)]:  # Flower's float64 would reject both
        second.add(reply)
    assert second.accepted == 2 and not second.rejected


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "fedadam", "fedavgm"])
def test_folding_updates_as_they_arrive_aggregates_as_flower_does_over_all(method):
    config = Settings.of(method=method, clients=4, max_train=300, server_lr=0.1)
    values, examples = [1.0, 2.5, -3.0, 7.0], [10, 200, 37, 1]
    pairs = list(enumerate(zip(values, examples, strict=True)))
    replies = [update(i, v, e) for i, (v, e) in pairs]
    flower, ours = make_strategy(config), make_strategy(config)
    assert averages(ours)
    for strategy in (flower, ours):
        list(strategy.configure_train(1, current(), ConfigRecord(), Connected(4)))
    expected = aggregate(flower, 1, replies)
    arriving = [update(i, v, e) for i, (v, e) in pairs]
    updates = received(arriving)
    assert all(ARRAYS not in r.content.array_records for r in arriving)  # each freed as folded
    folded = aggregate(ours, 1, updates.for_strategy())
    for name, array in expected.items():
        assert np.allclose(folded[name].numpy(), array.numpy(), rtol=1e-6, atol=1e-7)
    weighted = sum(v * e for _, (v, e) in pairs) / sum(examples)
    if method in ("fedavg", "fedprox"):
        assert np.allclose(folded["q.lora_A"].numpy(), weighted, rtol=1e-6)
