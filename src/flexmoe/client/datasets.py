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
from flexmoe.runconfig import RunConfig

GENERIC_TEXT_CHARS = 600
TRUNCATED = ("examples", "context_cut", "answer_cut")


@functools.lru_cache(maxsize=2)
def load_examples(data: str, max_per_task: int) -> tuple[InstructionExample, ...]:
    """The examples of ``data`` (``load_dataset``) in canonical order, once per process."""
    return tuple(load_dataset(data, max_per_task=max_per_task))


@functools.lru_cache(maxsize=4)
def client_datasets(config: RunConfig) -> tuple[ClientData, ...]:
    """Every client's train and test split, the same in every process for the same config.

    Each category's test pool is fixed by the data alone (``hold_out_test_pools``); the
    clients share the rest by ``config.split``.
    """
    return tuple(_split(config, config.data, config.clients, config.split, config.seed))


def own_client_data(config: RunConfig, path: str, client_id: int) -> ClientData:
    """Client ``client_id``'s data when its node holds its own file: all of it, split into
    test pools and training examples as the run's data is."""
    (client,) = _split(config, path, 1, "iid", config.seed * 10_007 + client_id)
    return replace(client, client_id=client_id)


def _split(config: RunConfig, data: str, clients: int, scheme: str, seed: int) -> list[ClientData]:
    examples = select_categories(load_examples(data, config.max_per_task), config.categories)
    held_out = hold_out_test_pools(examples, config.test_per_category, config.test_fraction)
    partition = partition_examples(held_out.train, clients, scheme, seed, config.alpha)
    datasets = build_client_datasets(
        held_out.train,
        partition,
        held_out.pools,
        seed,
        config.max_train,
        config.max_test,
        validation=config.eval_split == "validation",
    )
    for client in datasets:
        _check_not_empty(client)
    return datasets


def truncation_report(config: RunConfig) -> dict[str, dict[str, int]]:
    """Per category, how many of the examples the clients use had their input cut short to fit
    ``max-length`` tokens, and how many their answer even so (counted once each)."""
    tokenizer = load_tokenizer(config.model)
    used = {e: None for client in client_datasets(config) for e in client.train + client.test}
    report: dict[str, dict[str, int]] = {}
    for example in used:
        tokens = tokenize_example(example, tokenizer, config.max_length)
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
