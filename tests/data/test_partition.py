"""Pathological and Dirichlet partitions and per-client train/test splits."""

from __future__ import annotations

import numpy as np
import pytest

from flexmoe.data import (
    InstructionExample,
    build_client_datasets,
    dirichlet_partition,
    hold_out_test_pools,
    partition_examples,
    pathological_partition,
)
from flexmoe.errors import FlexMoEError


def make_examples(sizes: dict[str, int]) -> list[InstructionExample]:
    return [
        InstructionExample(f"{category} task", f"input {i}", f"output {i}", category)
        for category, size in sizes.items()
        for i in range(size)
    ]


def client_categories(examples, partition) -> list[set[str]]:
    return [{examples[i].category for i in indices} for indices in partition.client_indices]


def assert_each_index_once(partition, num_examples: int) -> None:
    flat = [i for indices in partition.client_indices for i in indices]
    assert sorted(flat) == list(range(num_examples))


def count_matrix(examples, partition) -> np.ndarray:
    """[num_categories, num_clients] example counts."""
    counts = np.zeros((len(partition.categories), partition.num_clients))
    for client, indices in enumerate(partition.client_indices):
        for i in indices:
            counts[partition.categories.index(examples[i].category), client] += 1
    return counts


SIZES = {"classification": 30, "closed_qa": 20, "summarization": 10, "brainstorming": 10}


def test_pathological_one_category_per_client():
    examples = make_examples(SIZES)
    partition = pathological_partition(examples, num_clients=4, seed=0)
    assert_each_index_once(partition, len(examples))
    assert [len(c) for c in client_categories(examples, partition)] == [1] * 4
    assert set().union(*client_categories(examples, partition)) == set(SIZES)


def test_pathological_more_clients_than_categories_splits_categories():
    examples = make_examples({"a": 30, "b": 20, "c": 10})
    partition = pathological_partition(examples, num_clients=6, seed=0)
    assert_each_index_once(partition, len(examples))
    categories = client_categories(examples, partition)
    assert all(len(c) == 1 for c in categories)
    owners = [next(iter(c)) for c in categories]
    assert owners == ["a", "a", "a", "b", "b", "c"]  # extra clients go to the biggest shares
    assert sorted(len(indices) for indices in partition.client_indices) == [10] * 6
    assert np.allclose(partition.proportions.sum(axis=1), 1)
    assert partition.proportions[0].tolist() == [1 / 3] * 3 + [0] * 3


def test_pathological_fewer_clients_uses_the_largest_categories():
    examples = make_examples(SIZES)
    partition = pathological_partition(examples, num_clients=2, seed=0)
    assert [c.pop() for c in client_categories(examples, partition)] == [
        "classification",
        "closed_qa",
    ]
    assert sum(map(len, partition.client_indices)) == 50


def test_pathological_with_chosen_categories():
    examples = make_examples(SIZES)
    partition = pathological_partition(examples, 3, seed=0, categories=["summarization"])
    assert all(c == {"summarization"} for c in client_categories(examples, partition))
    assert sorted(map(len, partition.client_indices)) == [3, 3, 4]


def test_pathological_is_deterministic_from_the_seed():
    examples = make_examples(SIZES)
    first = pathological_partition(examples, 6, seed=7).client_indices
    assert first == pathological_partition(examples, 6, seed=7).client_indices
    assert first != pathological_partition(examples, 6, seed=8).client_indices


def test_pathological_errors():
    examples = make_examples({"a": 2, "b": 1})
    with pytest.raises(FlexMoEError, match="4 clients but only 3 examples"):
        pathological_partition(examples, 4, seed=0)
    with pytest.raises(FlexMoEError, match="not in the data: zzz"):
        pathological_partition(examples, 2, seed=0, categories=["zzz"])
    with pytest.raises(FlexMoEError, match="num_clients=1"):
        pathological_partition(examples, 1, seed=0, categories=["a", "b"])
    with pytest.raises(FlexMoEError, match="at least 1"):
        pathological_partition(examples, 0, seed=0)


def test_every_example_needs_a_category():
    examples = [*make_examples({"a": 3}), InstructionExample("i", "", "o")]
    with pytest.raises(FlexMoEError, match="example 3 has no category"):
        dirichlet_partition(examples, 2, alpha=1.0, seed=0)


def test_dirichlet_counts_follow_the_drawn_proportions():
    examples = make_examples({"a": 900, "b": 600, "c": 1200, "d": 300})
    partition = dirichlet_partition(examples, num_clients=5, alpha=1.0, seed=0)
    assert_each_index_once(partition, len(examples))
    assert partition.proportions.shape == (4, 5)
    assert np.allclose(partition.proportions.sum(axis=1), 1)
    counts = count_matrix(examples, partition)
    sizes = counts.sum(axis=1, keepdims=True)
    assert np.abs(counts - sizes * partition.proportions).max() <= 1  # largest-remainder rounding
    expected = sizes * partition.proportions
    expected_mix = expected / expected.sum(axis=0)  # per-client category proportions
    assert np.abs(counts / counts.sum(axis=0) - expected_mix).max() < 0.01


def mean_top_share(alpha: float) -> float:
    """Average over clients of the share of their largest category."""
    examples = make_examples({f"c{k}": 200 for k in range(6)})
    counts = count_matrix(examples, dirichlet_partition(examples, 10, alpha, seed=0))
    return float((counts.max(axis=0) / counts.sum(axis=0)).mean())


def test_small_alpha_is_more_skewed_than_large_alpha():
    skewed, even = mean_top_share(0.1), mean_top_share(100.0)
    assert skewed > 0.6 and even < 0.3 and skewed > even


def test_dirichlet_gives_every_client_an_example():
    examples = make_examples({"a": 10, "b": 10, "c": 10})
    partition = dirichlet_partition(examples, num_clients=25, alpha=0.01, seed=1)
    assert_each_index_once(partition, len(examples))
    assert min(map(len, partition.client_indices)) >= 1


def test_dirichlet_is_deterministic_from_the_seed():
    examples = make_examples(SIZES)
    first = dirichlet_partition(examples, 4, 0.5, seed=3)
    again = dirichlet_partition(examples, 4, 0.5, seed=3)
    assert first.client_indices == again.client_indices
    assert np.array_equal(first.proportions, again.proportions)
    assert first.client_indices != dirichlet_partition(examples, 4, 0.5, seed=4).client_indices


def test_dirichlet_errors():
    examples = make_examples({"a": 2})
    with pytest.raises(FlexMoEError, match="3 clients but only 2 examples"):
        dirichlet_partition(examples, 3, 1.0, seed=0)
    with pytest.raises(FlexMoEError, match="alpha must be > 0"):
        dirichlet_partition(examples, 2, 0.0, seed=0)


def test_partition_examples_dispatches_by_scheme():
    examples = make_examples(SIZES)
    pathological = partition_examples(examples, 4, "pathological", seed=0)
    assert pathological.client_indices == pathological_partition(examples, 4, 0).client_indices
    dirichlet = partition_examples(examples, 4, "dirichlet", seed=0, alpha=0.3)
    assert dirichlet.client_indices == dirichlet_partition(examples, 4, 0.3, 0).client_indices
    with pytest.raises(FlexMoEError, match="unknown partition scheme 'random'"):
        partition_examples(examples, 4, "random", seed=0)
    with pytest.raises(FlexMoEError, match="only supported by the pathological"):
        partition_examples(examples, 4, "dirichlet", seed=0, categories=["closed_qa"])


def test_test_pools_are_each_categorys_first_examples_and_train_keeps_the_rest():
    examples = make_examples(SIZES)
    held = hold_out_test_pools(examples, per_category=5, fraction=0.2)
    # classification 30 -> 5 (the cap), closed_qa 20 -> 4, the 10-example ones -> 2
    assert {c: len(pool) for c, pool in held.pools.items()} == {
        "brainstorming": 2, "classification": 5, "closed_qa": 4, "summarization": 2,
    }  # fmt: skip
    for category, pool in held.pools.items():
        assert pool == [e for e in examples if e.category == category][: len(pool)]
    assert held.train == [e for e in examples if not any(e in p for p in held.pools.values())]
    assert len(held.train) + 13 == len(examples)
    tiny = make_examples({"closed_qa": 1, "summarization": 2})
    assert {c: len(p) for c, p in hold_out_test_pools(tiny, 100, 0.9).pools.items()} == {
        "closed_qa": 0, "summarization": 1,  # training keeps at least one
    }  # fmt: skip
    with pytest.raises(FlexMoEError, match=r"test fraction must be in \[0, 1\)"):
        hold_out_test_pools(examples, 5, 1.0)
    with pytest.raises(FlexMoEError, match="per category must be at least 1"):
        hold_out_test_pools(examples, 0, 0.2)


def split(examples, scheme="pathological", seed=0, **caps):
    held = hold_out_test_pools(examples, per_category=4, fraction=0.5)
    partition = partition_examples(held.train, 4, scheme, seed=seed, alpha=1.0)
    return held, build_client_datasets(held.train, partition, held.pools, seed, **caps)


def test_each_client_trains_on_its_share_and_tests_on_the_head_of_its_categorys_pool():
    examples = make_examples(SIZES)
    held, clients = split(examples)
    for client in clients:
        (category,) = client.categories
        assert client.test == held.pools[category]
        assert {e.category for e in client.train} == {category}
    trained = sorted(id(e) for c in clients for e in c.train)
    assert trained == sorted(map(id, held.train))

    _, capped = split(examples, max_train=5, max_test=2)
    assert [len(c.train) for c in capped] == [5] * 4
    assert [c.train for c in capped] == [c.train[:5] for c in clients]
    assert [c.test for c in capped] == [c.test[:2] for c in clients]
    with pytest.raises(FlexMoEError, match="max_test must be at least 1"):
        split(examples, max_test=0)


def test_the_test_examples_do_not_depend_on_the_seed_but_the_training_order_does():
    examples = make_examples(SIZES)
    _, first = split(examples, seed=0)
    _, second = split(examples, seed=1)
    assert sorted(str(c.test) for c in first) == sorted(str(c.test) for c in second)
    assert [c.train for c in first] != [c.train for c in second]


def test_a_dirichlet_clients_test_examples_follow_its_category_mix():
    examples = make_examples({"a": 200, "b": 200, "c": 200})
    held = hold_out_test_pools(examples, per_category=50, fraction=0.2)
    partition = partition_examples(held.train, 3, "dirichlet", seed=3, alpha=0.5)
    clients = build_client_datasets(held.train, partition, held.pools, 3, max_test=20)
    for client in clients:
        assert len(client.test) == 20
        trained = {c: sum(e.category == c for e in client.train) for c in "abc"}
        for category in "abc":
            tested = [e for e in client.test if e.category == category]
            assert tested == held.pools[category][: len(tested)]  # each pool's head
            assert abs(len(tested) - 20 * trained[category] / len(client.train)) < 1


def test_a_validation_split_is_carved_from_training_data_and_never_touches_the_test_split():
    examples = make_examples(SIZES)
    _, plain = split(examples, max_test=6)
    _, tuning = split(examples, max_test=6, validation=True)
    for client, held in zip(plain, tuning, strict=True):
        test = {id(e) for e in client.test}
        assert len(held.test) == len(client.test) > 0
        assert not test & {id(e) for e in held.train + held.test}  # the test split unseen
        assert {id(e) for e in held.train + held.test} <= {id(e) for e in client.train}
        assert not {id(e) for e in held.train} & {id(e) for e in held.test}
