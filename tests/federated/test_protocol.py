"""A SuperNode's node config, read with the same typed, range-checked declarations as settings."""

import pytest
from flwr.app import Context, RecordDict

from flexmoe.errors import FlexMoEError
from flexmoe.federated.protocol import DEPLOYED, SIMULATED, NodeConfig, NodeLimits


def node_config(**values) -> NodeConfig:
    node = {key.replace("_", "-"): value for key, value in values.items()}
    return NodeConfig.from_context(Context(1, 1, node, RecordDict(), {}))


def test_node_config_values_given_as_text_or_typed_read_alike():
    typed = node_config(partition_id=1, num_partitions=3, threads=2, min_batch_size=2)
    text = node_config(partition_id="1", num_partitions="3", threads="2", min_batch_size="2")
    assert typed == text
    assert (typed.partition_id, typed.num_partitions, typed.threads) == (1, 3, 2)
    assert typed.limits == NodeLimits(min_batch_size=2)  # the others keep a deployment's
    assert node_config(partition_id=0, share_diagnostics="true").limits.share_diagnostics


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ({"partition_id": "one"}, "partition-id must be a whole number, got 'one'"),
        ({"partition_id": 0, "threads": "many"}, "threads must be a whole number"),
        ({"partition_id": 0, "min_batch_size": 0}, "min-batch-size must be at least 1"),
        ({"partition_id": 0, "share_diagnostics": "perhaps"}, "share-diagnostics must be true"),
        ({}, "this SuperNode has no partition-id"),
    ],
)
def test_a_bad_node_config_is_one_error_naming_the_value(values, phrase):
    with pytest.raises(FlexMoEError, match=phrase):
        node_config(**values)


def test_a_deployed_node_keeps_its_diagnostics_and_a_simulated_one_shares_them():
    assert not DEPLOYED.share_diagnostics and SIMULATED.share_diagnostics
    assert DEPLOYED.min_batch_size > SIMULATED.min_batch_size == 1
