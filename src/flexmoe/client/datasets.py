"""A client's data: its train and test split, the same in every process for the same settings."""

from __future__ import annotations

import functools
from dataclasses import replace

from flexmoe.data import (
    ClientData,
    InstructionExample,
    build_client_datasets,
    category_of,
    heldout_texts,
    hold_out_test_pools,
    load_dataset,
    partition_examples,
    select_categories,
    tokenize_example,
)
from flexmoe.errors import FlexMoEError
from flexmoe.models.loading import load_tokenizer
from flexmoe.settings import DataSettings, Settings

GENERIC_TEXT_CHARS = 600
TRUNCATED = ("examples", "context_cut", "answer_cut")


@functools.lru_cache(maxsize=2)
def load_examples(data: str, max_per_task: int) -> tuple[InstructionExample, ...]:
    """The examples of ``data`` (``load_dataset``) in canonical order, once per process."""
    return tuple(load_dataset(data, max_per_task=max_per_task))


@functools.lru_cache(maxsize=4)
def client_datasets(data: DataSettings, clients: int, seed: int) -> tuple[ClientData, ...]:
    """Every client's train and test split, the same in every process for the same settings.

    Each category's test pool is fixed by the data alone (``hold_out_test_pools``); the
    clients share the rest by ``data.split``.
    """
    return tuple(_split(data, data.source, clients, data.split, seed))


def own_client_data(data: DataSettings, path: str, client_id: int, seed: int) -> ClientData:
    """Client ``client_id``'s data when its node holds its own file: all of it, split into
    test pools and training examples as the run's data is."""
    (client,) = _split(data, path, 1, "iid", seed * 10_007 + client_id)
    return replace(client, client_id=client_id)


def _split(
    data: DataSettings, source: str, clients: int, scheme: str, seed: int
) -> list[ClientData]:
    examples = select_categories(load_examples(source, data.max_per_task), data.categories)
    held_out = hold_out_test_pools(examples, data.test_per_category, data.test_fraction)
    partition = partition_examples(held_out.train, clients, scheme, seed, data.alpha)
    datasets = build_client_datasets(
        held_out.train,
        partition,
        held_out.pools,
        seed,
        data.max_train,
        data.max_test,
        validation=data.eval_split == "validation",
    )
    for client in datasets:
        _check_not_empty(client)
    return datasets


def truncation_report(settings: Settings) -> dict[str, dict[str, int]]:
    """Per category, how many of the examples the clients use had their input cut short to fit
    ``max-length`` tokens, and how many their answer even so (counted once each)."""
    tokenizer = load_tokenizer(settings.model)
    clients = client_datasets(settings.data, settings.federation.clients, settings.seed)
    used = {e: None for client in clients for e in client.train + client.test}
    report: dict[str, dict[str, int]] = {}
    for example in used:
        tokens = tokenize_example(example, tokenizer, settings.data.max_length)
        counts = report.setdefault(category_of(example), dict.fromkeys(TRUNCATED, 0))
        counts["examples"] += 1
        counts["context_cut"] += tokens.context_cut
        counts["answer_cut"] += tokens.answer_cut
    return dict(sorted(report.items()))


def _check_not_empty(client: ClientData) -> None:
    if not client.train or not client.test:
        raise FlexMoEError(
            f"client {client.client_id} has no {'training' if not client.train else 'test'} "
            f"examples; use fewer clients or more data"
        )


@functools.cache
def generic_texts() -> tuple[str, ...]:
    """Generic English text (the bundled model's held-out samples) for the generic ablation."""
    return tuple(
        text[i : i + GENERIC_TEXT_CHARS]
        for text in heldout_texts().values()
        for i in range(0, len(text), GENERIC_TEXT_CHARS)
    )
