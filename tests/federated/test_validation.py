"""The server's checks of client updates, and robust aggregation, on real Flower messages."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from flexmoe.errors import FlexMoEError
from flexmoe.federated.federation import aggregate, screen
from flexmoe.federated.protocol import NUM_EXAMPLES, TrainReply
from flexmoe.federated.strategies import make_strategy
from flexmoe.federated.validation import screen_updates
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
    valid, rejected = screen_updates([good, update(1, **bad)], current(), max_examples=300)
    assert valid == [good]
    assert [r.client_id for r in rejected] == [1] and reason in rejected[0].reason


def test_a_float_example_count_another_dtype_or_unreadable_metrics_are_rejected():
    count, dtype, unreadable = update(1), update(2), update(3)
    count.content.metric_records["metrics"][NUM_EXAMPLES] = 10.5
    dtype.content.array_records["arrays"]["q.lora_B"] = Array(np.zeros((3, 2)))
    del unreadable.content.metric_records["metrics"]["client-id"]
    _, rejected = screen_updates([count, dtype, unreadable], current(), 300)
    assert "claims 10.5" in rejected[0].reason
    assert rejected[2].client_id == -1 and "client-id" in rejected[2].reason
    assert "'q.lora_B' as float64 (3, 2); the global parameter is float32" in rejected[1].reason


def test_the_round_goes_on_without_rejected_updates_when_enough_remain():
    replies = [update(0, 1.0), update(1, 3.0), update(2, float("inf"))]
    config = Settings.of(clients=3, min_updates=2, max_train=300)
    valid, rejected = screen(1, replies, current(), config)
    arrays = aggregate(make_strategy(config), 1, valid)
    assert np.allclose(arrays["q.lora_A"].numpy(), 2.0)  # the mean of the two valid ones
    assert [r.client_id for r in rejected] == [2]
    every = Settings.of(clients=3, max_train=300)  # min-updates 0: every reply must be valid
    with pytest.raises(FlexMoEError, match=r"2 of 3 updates are valid.*client 2: holds non-finite"):
        screen(1, replies, current(), every)


@pytest.mark.parametrize(("aggregation", "expected"), [("median", 2.0), ("trimmed-mean", 2.5)])
def test_robust_aggregation_resists_an_outlying_update(aggregation, expected):
    values = [1.0, 2.0, 3.0, 1000.0] if aggregation == "trimmed-mean" else [1.0, 2.0, 1000.0]
    replies = [update(i, v) for i, v in enumerate(values)]
    config = Settings.of(clients=len(values), aggregation=aggregation, trim_fraction=0.25)
    valid, _ = screen(1, replies, current(), config)
    arrays = aggregate(make_strategy(config), 1, valid)
    assert np.allclose(arrays["q.lora_B"].numpy(), expected)


def test_robust_aggregation_is_refused_for_server_optimisers():
    with pytest.raises(FlexMoEError, match="fedadam aggregates with its own server optimiser"):
        make_strategy(Settings.of(method="fedadam", aggregation="median"))


@pytest.mark.parametrize("method", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_a_server_optimisers_aggregate_keeps_the_wire_dtype_so_the_next_round_is_accepted(method):
    config = Settings.of(method=method, clients=2, max_train=300, server_lr=0.1)
    strategy = make_strategy(config)
    list(strategy.configure_train(1, current(), ConfigRecord(), Connected(2)))
    arrays = aggregate(
        strategy, 1, screen(1, [update(0, 1.0), update(1, 3.0)], current(), config)[0]
    )
    assert {a.dtype for a in arrays.values()} == {"float32"}
    assert not np.allclose(arrays["q.lora_A"].numpy(), 0.0)  # the server stepped
    second = [update(0, 2.0), update(1, 2.0)]
    valid, rejected = screen(2, second, arrays, config)  # Flower's float64 would reject both
    assert len(valid) == 2 and not rejected
