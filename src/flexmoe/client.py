"""One client's life in a federation: its data, its personal state on disk, its rounds.

Core code: the Flower ClientApp only translates messages to and from these calls. Personal state
is written after every round to ``state_dir/round-NNNN`` (a directory swapped in atomically) and a
round always starts from the state of the latest earlier round, so a run resumed after a crash
redoes an unfinished round from the same state and gets the same result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.data import (
    ClientData,
    InstructionExample,
    TokenizedExample,
    build_client_datasets,
    collate,
    default_cache_dir,
    format_prompt,
    iterate_batches,
    load_dataset,
    pad_token_id,
    partition_examples,
    sequential_batches,
    tokenize_examples,
)
from flexmoe.errors import FlexMoEError
from flexmoe.evaluation.cost import flops_per_token
from flexmoe.evaluation.generation import generate_answers, rouge_l
from flexmoe.evaluation.perplexity import domain_perplexities, heldout_texts
from flexmoe.evaluation.routing import routing_statistics
from flexmoe.io import atomic_write_text
from flexmoe.loading import load_model, load_tokenizer
from flexmoe.methods import get_method
from flexmoe.model import FlexConfig, FlexModel
from flexmoe.roles import Role
from flexmoe.runconfig import RunConfig
from flexmoe.training import cosine_lr, mean_loss, train_steps

KEEP_ROUNDS = 2
HELDOUT_TOKENS = 2048  # per pretraining domain
GENERIC_TEXT_CHARS = 600

State = dict[str, torch.Tensor]


@functools.lru_cache(maxsize=2)
def load_examples(data: str, max_per_task: int) -> tuple[InstructionExample, ...]:
    """Natural Instructions v1 (``ni``) or the user's own instruction file, once per process."""
    return tuple(load_dataset(data, max_per_task=max_per_task))


def fitting_examples(
    examples: Sequence[InstructionExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[InstructionExample]:
    """The examples whose prompt, answer and eos fit in ``max_length`` tokens, untruncated.

    Tokenizing a whole data set takes a while, and every client process needs the answer, so
    the kept indices are cached on disk under a hash of everything they depend on.
    """
    key = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    for example in examples:
        key.update(json.dumps([example.instruction, example.input, example.output]).encode())
    cache = default_cache_dir() / "fitting" / f"{key.hexdigest()[:24]}-{max_length}.json"
    if cache.is_file():
        kept = json.loads(cache.read_text())
    else:
        prompts = tokenizer([format_prompt(e) for e in examples])["input_ids"]
        answers = tokenizer([e.output for e in examples], add_special_tokens=False)["input_ids"]
        lengths = [len(p) + len(a) for p, a in zip(prompts, answers, strict=True)]
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
    tokenizer = load_tokenizer(config.model)
    examples = fitting_examples(
        load_examples(config.data, config.max_per_task), tokenizer, config.max_length
    )
    partition = partition_examples(
        examples, config.clients, config.split, config.seed, config.alpha
    )
    datasets = build_client_datasets(
        examples, partition, config.test_fraction, config.seed, config.max_train, config.max_test
    )
    for client in datasets:
        if not client.train or not client.test:
            raise FlexMoEError(
                f"client {client.client_id} has no {'training' if not client.train else 'test'} "
                f"examples; use fewer clients or more data"
            )
    return tuple(datasets)


@dataclass
class RoundResult:
    shared: State
    num_examples: int
    metrics: dict[str, float]


class ClientWorker:
    """A client of a run: builds its model for a round, trains it, evaluates it."""

    def __init__(self, config: RunConfig, client_id: int, state_dir: Path) -> None:
        self.config = config
        self.method = get_method(config.method)
        self.client_id = client_id
        self.state_dir = Path(state_dir)
        datasets = client_datasets(config)
        if not 0 <= client_id < len(datasets):
            raise FlexMoEError(f"client {client_id} is not among the {len(datasets)} clients")
        self.data = datasets[client_id]
        self.tokenizer = load_tokenizer(config.model)
        self.train_examples = tokenize_examples(self.data.train, self.tokenizer, config.max_length)

    @property
    def seed(self) -> int:
        return self.config.seed * 10_007 + self.client_id

    def train(self, round_: int, global_shared: State, proximal_mu: float = 0.0) -> RoundResult:
        """One round of local training from the latest earlier state and the global parameters."""
        model = self.model_for_round(round_, global_shared)
        batches = iterate_batches(
            self.train_examples,
            self.config.batch_size,
            self.seed,
            start_step=(round_ - 1) * self.config.local_steps,
        )
        torch.manual_seed(self.seed * 1_000 + round_)
        lr = cosine_lr(round_, self.config.rounds, self.config.lr, self.config.min_lr)
        losses = train_steps(
            model.model,  # parameter names as in the shared state, for the proximal anchor
            (collate(b, pad_token_id(self.tokenizer)) for b in batches),
            self.config.local_steps,
            lr,
            anchor=global_shared if proximal_mu > 0 else None,
            proximal_mu=proximal_mu,
        )
        self.save_state(model, round_)
        metrics = {"train_loss": sum(losses) / len(losses), "lr": lr}
        shared = model.shared_state_dict() if self.method.federated else {}
        return RoundResult(shared, len(self.data.train), metrics)

    def evaluate(
        self, round_: int, global_shared: State, detailed: bool = False
    ) -> tuple[dict[str, float], dict]:
        """ROUGE-L and test loss of the model this client would use after ``round_``.

        ``detailed`` adds what it costs in knowledge, routing and compute: held-out
        perplexity per pretraining domain and routing statistics on the test split, each next
        to the base model's, and the MoE FLOPs per token.
        """
        model = self.model_for_round(round_ + 1, global_shared)
        answers = generate_answers(
            model,
            self.tokenizer,
            self.data.test,
            self.config.max_new_tokens,
            self.config.max_length,
            self.config.batch_size,
        )
        scores = rouge_l(answers, [e.output for e in self.data.test])
        test = tokenize_examples(self.data.test, self.tokenizer, self.config.max_length)
        batches = sequential_batches(test, self.config.batch_size, pad_token_id(self.tokenizer))
        metrics = {
            "rouge_l": 100 * sum(scores) / len(scores),
            "test_loss": mean_loss(model, batches),
        }
        return metrics, self.diagnostics(model, batches) if detailed else {}

    def diagnostics(self, model: FlexModel, batches: list[dict[str, torch.Tensor]]) -> dict:
        base, _ = load_model(self.config.model)
        flops = flops_per_token(model)
        return {
            "knowledge": {
                "heldout_ppl": domain_perplexities(model, self.tokenizer, HELDOUT_TOKENS),
                "heldout_ppl_base": base_heldout_perplexities(self.config.model),
            },
            "routing": {
                "base": routing_statistics(base, batches),
                "final": routing_statistics(model, batches),
            },
            "flops_per_token": {k: flops[k] for k in ("base", "personalised", "ratio")},
            "grafted_experts": {str(g.layer): list(g.source_experts) for g in model.grafts},
        }

    def model_for_round(self, round_: int, global_shared: State) -> FlexModel:
        """The latest state saved before ``round_`` (or a fresh graft), with global parameters."""
        base, _ = load_model(self.config.model)
        previous = self.latest_state(before=round_)
        if previous is None:
            model = self.fresh_model(base)
        else:
            model = FlexModel.from_pretrained(base, previous)
        if self.method.federated:
            model.load_state_of(Role.SHARED, global_shared)
        return model

    def fresh_model(self, base: torch.nn.Module) -> FlexModel:
        """The client's model at its first participation: grafted as its method says."""
        torch.manual_seed(self.seed)
        config = FlexConfig(
            experts_per_layer=self.config.experts_per_layer,
            size_ratio=self.config.size_ratio,
            gate_bias=self.config.gate_bias,
            selection="random" if self.method.graft == "random" else "top",
            seed=self.seed,
            shared=self.method.shared,
        )
        if self.method.graft == "none":
            return FlexModel(base, config=config)
        batches = self.selection_batches()
        model, _ = FlexModel.graft(base, batches, config)
        return model

    def selection_batches(self) -> list[dict[str, torch.Tensor]]:
        """The client's training data, or generic text for the generic ablation."""
        examples = self.train_examples
        if self.method.graft == "generic":
            ids = [self.tokenizer.encode(t)[: self.config.max_length] for t in generic_texts()]
            examples = [TokenizedExample(i, i) for i in ids if i]
        return sequential_batches(examples, self.config.batch_size, pad_token_id(self.tokenizer))

    def save_state(self, model: FlexModel, round_: int) -> Path:
        """Write this round's state beside the others, swapped in atomically."""
        final = self.state_dir / f"round-{round_:04d}"
        staging = self.state_dir / f".round-{round_:04d}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, include_shared=not self.method.federated)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in self.saved_rounds()[:-KEEP_ROUNDS]:
            shutil.rmtree(self.state_dir / f"round-{old:04d}", ignore_errors=True)
        return final

    def saved_rounds(self) -> list[int]:
        if not self.state_dir.is_dir():
            return []
        return sorted(int(p.name[6:]) for p in self.state_dir.glob("round-[0-9]*"))

    def latest_state(self, before: int) -> Path | None:
        rounds = [r for r in self.saved_rounds() if r < before]
        return self.state_dir / f"round-{rounds[-1]:04d}" if rounds else None


@functools.lru_cache(maxsize=2)
def _base_heldout(model: str) -> tuple[tuple[str, float], ...]:
    base, tokenizer = load_model(model)
    return tuple(domain_perplexities(base, tokenizer, HELDOUT_TOKENS).items())


def base_heldout_perplexities(model: str) -> dict[str, float]:
    """The base model's held-out perplexity per domain, computed once per process."""
    return dict(_base_heldout(model))


@functools.cache
def generic_texts() -> tuple[str, ...]:
    """Generic English text (the bundled model's held-out samples) for the generic ablation."""
    return tuple(
        text[i : i + GENERIC_TEXT_CHARS]
        for text in heldout_texts().values()
        for i in range(0, len(text), GENERIC_TEXT_CHARS)
    )
