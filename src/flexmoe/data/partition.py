"""Fixed test pools per category, client partitions (pathological, Dirichlet, IID), and each
client's train and test examples.

The test pools depend on the data alone; every other function is deterministic given its seed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexmoe.data.records import InstructionExample
from flexmoe.errors import FlexMoEError

SCHEMES = ("pathological", "dirichlet", "iid")
UNCATEGORISED = "uncategorised"


@dataclass(frozen=True)
class Partition:
    """Example indices per client and the category-by-client shares they were drawn from."""

    client_indices: list[list[int]]
    categories: list[str]
    proportions: np.ndarray
    """[num_categories, num_clients]: intended share of each category's examples per client."""

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)


@dataclass(frozen=True)
class ClientData:
    """One client's examples, split into train and test."""

    client_id: int
    train: list[InstructionExample]
    test: list[InstructionExample]

    @property
    def categories(self) -> list[str]:
        """Distinct categories in this client's data, sorted."""
        return sorted({category_of(e) for e in self.train + self.test})


def partition_examples(
    examples: Sequence[InstructionExample],
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float = 1.0,
    categories: Sequence[str] | None = None,
) -> Partition:
    """Dispatch to `pathological_partition`, `dirichlet_partition` or `iid_partition` by name."""
    if scheme == "iid":
        if categories is not None:
            raise FlexMoEError("choosing categories is only supported by the pathological scheme")
        return iid_partition(examples, num_clients, seed)
    if scheme == "pathological":
        return pathological_partition(examples, num_clients, seed, categories)
    if scheme == "dirichlet":
        if categories is not None:
            raise FlexMoEError("choosing categories is only supported by the pathological scheme")
        return dirichlet_partition(examples, num_clients, alpha, seed)
    raise FlexMoEError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def iid_partition(examples: Sequence[InstructionExample], num_clients: int, seed: int) -> Partition:
    """Shuffle the examples and deal them out in equal shares: no category needed."""
    _check_enough_examples(len(examples), num_clients)
    shuffled = np.random.default_rng(seed).permutation(len(examples))
    client_indices = [part.tolist() for part in np.array_split(shuffled, num_clients)]
    categories = sorted({category_of(e) for e in examples})
    proportions = np.full((len(categories), num_clients), 1 / num_clients)
    return Partition(client_indices, categories, proportions)


def pathological_partition(
    examples: Sequence[InstructionExample],
    num_clients: int,
    seed: int,
    categories: Sequence[str] | None = None,
) -> Partition:
    """Give every client examples of exactly one category.

    With fewer clients than categories, the `num_clients` largest categories are used (ties broken
    by name) unless `categories` names them. With more clients, the extra clients go one at a time
    to the category with the most examples per client, and clients sharing a category split its
    examples evenly.
    """
    labels = _labels(examples)
    by_category = _indices_by_category(labels)
    chosen = _choose_categories(by_category, num_clients, categories)
    _check_enough_examples(sum(len(by_category[c]) for c in chosen), num_clients)
    shares = _clients_per_category({c: len(by_category[c]) for c in chosen}, num_clients)
    rng = np.random.default_rng(seed)
    all_categories = sorted(by_category)
    proportions = np.zeros((len(all_categories), num_clients))
    client_indices: list[list[int]] = []
    for category in chosen:
        first = len(client_indices)
        shuffled = rng.permutation(by_category[category])
        client_indices += [part.tolist() for part in np.array_split(shuffled, shares[category])]
        proportions[all_categories.index(category), first : len(client_indices)] = (
            1 / shares[category]
        )
    return Partition(client_indices, all_categories, proportions)


def dirichlet_partition(
    examples: Sequence[InstructionExample], num_clients: int, alpha: float, seed: int
) -> Partition:
    """Split each category over clients in proportions drawn from Dirichlet(alpha).

    Counts follow the drawn proportions up to rounding (largest remainder). A client left empty then
    takes one example from the client holding the most, so every client has at least one.
    """
    if not alpha > 0:
        raise FlexMoEError(f"Dirichlet alpha must be > 0, got {alpha}")
    labels = _labels(examples)
    _check_num_clients(num_clients)
    _check_enough_examples(len(labels), num_clients)
    by_category = _indices_by_category(labels)
    categories = sorted(by_category)
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(categories))
    client_indices: list[list[int]] = [[] for _ in range(num_clients)]
    for category, shares in zip(categories, proportions, strict=True):
        shuffled = rng.permutation(by_category[category])
        bounds = np.cumsum(_apportion(len(shuffled), shares))[:-1]
        for client, part in enumerate(np.split(shuffled, bounds)):
            client_indices[client] += part.tolist()
    _fill_empty_clients(client_indices)
    return Partition(client_indices, categories, proportions)


@dataclass(frozen=True)
class TestPools:
    """Each category's fixed test examples, and the examples left for training."""

    pools: dict[str, list[InstructionExample]]
    train: list[InstructionExample]


def hold_out_test_pools(
    examples: Sequence[InstructionExample], per_category: int, fraction: float
) -> TestPools:
    """Hold out each category's first ``min(per_category, round(n * fraction))`` examples (of
    its n, keeping at least one to train on) as its test pool.

    The pools depend on the examples and their order alone (``canonical_order``), not on a
    seed, so every run of every method scores the same test examples.
    """
    if per_category < 1:
        raise FlexMoEError(f"test examples per category must be at least 1, got {per_category}")
    if not 0 <= fraction < 1:
        raise FlexMoEError(f"test fraction must be in [0, 1), got {fraction}")
    by_category: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_category.setdefault(category_of(example), []).append(index)
    pools, held = {}, set()
    for category, indices in sorted(by_category.items()):
        size = min(per_category, round(len(indices) * fraction), len(indices) - 1)
        pools[category] = [examples[i] for i in indices[:size]]
        held.update(indices[:size])
    return TestPools(pools, [e for i, e in enumerate(examples) if i not in held])


def build_client_datasets(
    examples: Sequence[InstructionExample],
    partition: Partition,
    test_pools: dict[str, list[InstructionExample]],
    seed: int,
    max_train: int | None = None,
    max_test: int | None = None,
    validation: bool = False,
) -> list[ClientData]:
    """Every client's training share of ``examples`` (shuffled, capped at ``max_train``), and
    its test examples: the first of each category's fixed pool, as many from each as the
    category's share of the client's training examples (``max_test`` in all; without a cap,
    all of its categories' pools).

    With ``validation`` the evaluated part is carved from the training part instead (as many
    examples as the test part would hold, the training part keeping at least one), so
    hyperparameters can be chosen without ever seeing the test split.
    """
    for name, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and cap < 1:
            raise FlexMoEError(f"{name} must be at least 1 (or unset for no cap), got {cap}")
    clients = []
    for client_id, indices in enumerate(partition.client_indices):
        rng = np.random.default_rng([seed, client_id])
        train = [examples[i] for i in rng.permutation(indices)]
        test = _test_examples(train, test_pools, max_test)
        if validation:
            held = min(len(test), max(len(train) - 1, 0))
            train, test = train[held:], train[:held]
        clients.append(ClientData(client_id, train[:max_train], test))
    return clients


def _test_examples(
    train: Sequence[InstructionExample],
    test_pools: dict[str, list[InstructionExample]],
    max_test: int | None,
) -> list[InstructionExample]:
    """The first examples of each pool, in proportion to the categories of ``train``."""
    counts = Counter(category_of(example) for example in train)
    categories = sorted(c for c in counts if test_pools.get(c))
    if not categories:
        return []
    available = sum(len(test_pools[c]) for c in categories)
    total = available if max_test is None else min(max_test, available)
    shares = np.array([counts[c] for c in categories]) / sum(counts[c] for c in categories)
    wanted = _apportion(total, shares)
    return [e for c, n in zip(categories, wanted, strict=True) for e in test_pools[c][:n]]


def category_of(example: InstructionExample) -> str:
    """The category of ``example``, or "uncategorised"."""
    return example.category or UNCATEGORISED


def _labels(examples: Sequence[InstructionExample]) -> list[str]:
    labels = []
    for index, example in enumerate(examples):
        if example.category is None:
            raise FlexMoEError(
                f"example {index} has no category, but non-IID partitioning groups examples by "
                "category; use split iid, or data with a 'category' field (e.g. Dolly or Natural "
                "Instructions)"
            )
        labels.append(example.category)
    return labels


def _indices_by_category(labels: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return groups


def _choose_categories(
    by_category: dict[str, list[int]], num_clients: int, requested: Sequence[str] | None
) -> list[str]:
    _check_num_clients(num_clients)
    if requested is None:
        largest_first = sorted(by_category, key=lambda c: (-len(by_category[c]), c))
        return sorted(largest_first[:num_clients])
    unknown = [c for c in requested if c not in by_category]
    if unknown:
        raise FlexMoEError(
            f"categories not in the data: {', '.join(unknown)}; "
            f"available: {', '.join(sorted(by_category))}"
        )
    if not requested or len(set(requested)) > num_clients:
        raise FlexMoEError(
            f"the pathological scheme needs between 1 and num_clients={num_clients} distinct "
            f"categories, got {len(set(requested))}; choose fewer categories or add clients"
        )
    return sorted(set(requested))


def _clients_per_category(sizes: dict[str, int], num_clients: int) -> dict[str, int]:
    """One client per category, each extra client to the most examples per client (D'Hondt)."""
    shares = dict.fromkeys(sizes, 1)
    for _ in range(num_clients - len(sizes)):
        busiest = max(sorted(sizes), key=lambda c: sizes[c] / shares[c])
        shares[busiest] += 1
    return shares


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, closest to total * shares (largest remainder)."""
    exact = total * shares
    counts = np.floor(exact).astype(int)
    remainder = total - counts.sum()
    counts[np.argsort(counts - exact, kind="stable")[:remainder]] += 1
    return counts


def _fill_empty_clients(client_indices: list[list[int]]) -> None:
    for client in client_indices:
        if not client:
            donor = max(client_indices, key=len)
            client.append(donor.pop())


def _check_num_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise FlexMoEError(f"number of clients must be at least 1, got {num_clients}")


def _check_enough_examples(num_examples: int, num_clients: int) -> None:
    if num_clients > num_examples:
        raise FlexMoEError(
            f"{num_clients} clients but only {num_examples} examples to share among them; "
            "use fewer clients or more data"
        )
