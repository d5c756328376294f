"""A client's data: its train and test split, the same in every process for the same settings."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.cache import cache_dir
from flexmoe.data import (
    ClientData,
    InstructionExample,
    build_client_datasets,
    encode_prompts,
    format_prompt,
    heldout_texts,
    load_dataset,
    partition_examples,
)
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_text
from flexmoe.loading import load_tokenizer
from flexmoe.runconfig import RunConfig

GENERIC_TEXT_CHARS = 600


@functools.lru_cache(maxsize=2)
def load_examples(data: str, max_per_task: int) -> tuple[InstructionExample, ...]:
    """Natural Instructions v1 (``ni``) or the user's own instruction file, once per process."""
    return tuple(load_dataset(data, max_per_task=max_per_task))


def fitting_examples(
    examples: Sequence[InstructionExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[InstructionExample]:
    """The examples whose prompt, answer and eos fit in ``max_length`` tokens, untruncated.

    Tokenizing a whole data set takes a while, and every client process needs the answer, so
    the kept indices are cached on disk under a hash of everything they depend on: the
    tokenizer and each example's prompt (as the template makes it) and answer.
    """
    prompts = [format_prompt(example, tokenizer) for example in examples]
    key = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    for prompt, example in zip(prompts, examples, strict=True):
        key.update(json.dumps([prompt, example.output]).encode())
    cache = cache_dir() / "fitting" / f"{key.hexdigest()[:24]}-{max_length}.json"
    if cache.is_file():
        kept = json.loads(cache.read_text())
    else:
        prompt_ids = encode_prompts(prompts, tokenizer)
        answers = tokenizer([e.output for e in examples], add_special_tokens=False)["input_ids"]
        lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answers, strict=True)]
        kept = [i for i, length in enumerate(lengths) if length < max_length]
        atomic_write_text(cache, json.dumps(kept))
    if not kept:
        raise FlexMoEError(f"no example fits in max-length={max_length} tokens; raise it")
    return [examples[i] for i in kept]


@functools.lru_cache(maxsize=4)
def client_datasets(config: RunConfig) -> tuple[ClientData, ...]:
    """Every client's train and test split, the same in every process for the same config.

    Only examples that fit ``max_length`` whole are used, so no answer is cut off in training
    and every test prompt leaves room to answer.
    """
    examples = usable_examples(config, config.data)
    partition = partition_examples(
        examples, config.clients, config.split, config.seed, config.alpha
    )
    datasets = build_client_datasets(
        examples,
        partition,
        config.test_fraction,
        config.seed,
        config.max_train,
        config.max_test,
        validation=config.eval_split == "validation",
    )
    for client in datasets:
        _check_not_empty(client)
    return tuple(datasets)


def usable_examples(config: RunConfig, data: str) -> list[InstructionExample]:
    """The examples of ``data`` that fit ``config``'s model and length."""
    examples = load_examples(data, config.max_per_task)
    return fitting_examples(examples, load_tokenizer(config.model), config.max_length)


def own_client_data(config: RunConfig, path: str, client_id: int) -> ClientData:
    """Client ``client_id``'s data when its node holds its own file: all of it, split into
    train and test (or validation) parts as a share of the run's data is."""
    examples = usable_examples(config, path)
    whole = partition_examples(examples, 1, "iid", config.seed)
    (client,) = build_client_datasets(
        examples,
        whole,
        config.test_fraction,
        config.seed * 10_007 + client_id,
        config.max_train,
        config.max_test,
        validation=config.eval_split == "validation",
    )
    client = replace(client, client_id=client_id)
    _check_not_empty(client)
    return client


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
