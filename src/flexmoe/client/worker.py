"""One client's round work: build its model for a round, train it, evaluate it.

Core code: the Flower ClientApp only translates messages to and from these calls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexmoe.client.base_models import BASE_MODELS
from flexmoe.client.datasets import client_datasets, generic_texts, own_client_data
from flexmoe.client.state import StateStore
from flexmoe.data import (
    InstructionExample,
    TokenizedExample,
    collate,
    iterate_batches,
    pad_token_id,
    sequential_batches,
    tokenize_examples,
)
from flexmoe.errors import FlexMoEError
from flexmoe.evaluation.diagnostics import BaseMeasures, diagnostics, measure_base
from flexmoe.evaluation.generation import generate_answers, rouge_l
from flexmoe.evaluation.routing import RoutingRecorder
from flexmoe.flex.config import FlexConfig
from flexmoe.flex.model import FlexModel
from flexmoe.flex.roles import Role
from flexmoe.hardware import Placement, Stopwatch
from flexmoe.methods import GraftSource
from flexmoe.models.loading import load_tokenizer
from flexmoe.results import Diagnostics, RoutingStatistics
from flexmoe.settings import Settings
from flexmoe.training import cosine_lr, mean_loss, train_steps

State = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """What one round of local training gives the server, and what it measured."""

    shared: State
    num_examples: int
    train_loss: float
    lr: float
    proximal_mu: float
    seconds: dict[str, float]  # load, restore, compute, save


@dataclass
class Evaluation:
    """Scores of the model a client would use, with its diagnostics when asked."""

    rouge_l: float
    test_loss: float
    seconds: dict[str, float]  # load, restore, answer, test_loss, diagnostics
    diagnostics: Diagnostics | None = None


class ClientWorker:
    """A client of a run: builds its model for a round, trains it, evaluates it."""

    def __init__(
        self, settings: Settings, client_id: int, state_dir: Path, own_data: str | None = None
    ) -> None:
        """``own_data``, a node's own data file, is all this client's (split into its train and
        test parts); without it the client takes its share of the run's data."""
        self.settings = settings
        self.method = settings.chosen_method()
        self.client_id = client_id
        self.store = StateStore(state_dir)
        if own_data is not None:
            self.data = own_client_data(settings.data, own_data, client_id, settings.seed)
        else:
            clients = settings.federation.clients
            datasets = client_datasets(settings.data, clients, settings.seed)
            if not 0 <= client_id < len(datasets):
                raise FlexMoEError(f"client {client_id} is not among the {len(datasets)} clients")
            self.data = datasets[client_id]
        self.tokenizer = load_tokenizer(settings.model)
        self.placement = Placement.resolve(settings.device, settings.dtype)
        self.max_length = settings.data.max_length
        self.train_examples = tokenize_examples(self.data.train, self.tokenizer, self.max_length)

    @property
    def seed(self) -> int:
        return self.settings.seed * 10_007 + self.client_id

    def train(self, round_: int, global_shared: State, proximal_mu: float = 0.0) -> TrainResult:
        """One round of local training from the latest earlier state and the global parameters.

        ``proximal_mu`` > 0 adds FedProx's proximal term towards ``global_shared``.
        """
        train = self.settings.train
        batches = iterate_batches(
            self.train_examples,
            train.batch_size,
            self.seed,
            start_step=(round_ - 1) * train.local_steps,
        )
        lr = cosine_lr(round_, self.settings.federation.rounds, train.lr, train.min_lr)
        clock = Stopwatch(self.placement.device)
        with self.model_for_round(round_, global_shared, clock) as model:
            torch.manual_seed(self.seed * 1_000 + round_)
            with clock.lap("compute"), self.placement.autocast():
                losses = train_steps(
                    model.model,  # names as in the shared state, for the proximal anchor
                    (collate(b, pad_token_id(self.tokenizer)) for b in batches),
                    train.local_steps,
                    lr,
                    anchor=global_shared if proximal_mu > 0 else None,
                    proximal_mu=proximal_mu,
                    gradient_checkpointing=train.gradient_checkpointing,
                    micro_batch_size=train.micro_batch_size,
                )
            self.check_finite(round_, losses, model)
            with clock.lap("save"):
                self.store.save(model, round_, include_shared=not self.method.federated)
                shared = _on_host(model.shared_state_dict()) if self.method.federated else {}
        mean = sum(losses) / len(losses)
        return TrainResult(shared, len(self.data.train), mean, lr, proximal_mu, clock.seconds)

    def check_finite(self, round_: int, losses: list[float], model: FlexModel) -> None:
        """Refuse a round whose loss or trained parameters are not finite, before it is saved."""
        if not all(math.isfinite(loss) for loss in losses):
            raise FlexMoEError(
                f"client {self.client_id}, round {round_}: the training loss became "
                f"{next(x for x in losses if not math.isfinite(x))}; lower the learning rate"
            )
        broken = [
            name
            for name, parameter in model.model.named_parameters()
            if parameter.requires_grad and not torch.isfinite(parameter).all()
        ]
        if broken:
            raise FlexMoEError(
                f"client {self.client_id}, round {round_}: {len(broken)} trained parameters "
                f"hold non-finite values (e.g. {broken[0]}); lower the learning rate"
            )

    def evaluate(self, round_: int, global_shared: State, detailed: bool = False) -> Evaluation:
        """ROUGE-L and test loss of the model this client would use after ``round_``.

        ``detailed`` adds what it costs in knowledge, routing and compute (see
        ``flexmoe.evaluation.diagnostics``).
        """
        test = tokenize_examples(self.data.test, self.tokenizer, self.max_length)
        test.sort(key=lambda e: len(e.input_ids))  # little padding; the loss is a token mean
        # scored in training-sized batches: logits over the vocabulary at every answer position
        # of a batch take memory as a training step does (32 x 512 x 49k floats are 3 GB)
        batches = sequential_batches(
            test, self.settings.train.batch_size, pad_token_id(self.tokenizer)
        )
        clock = Stopwatch(self.placement.device)
        base = None
        if detailed and self.method.shared.trains_base_weights:
            with clock.lap("diagnostics"):
                base = self.pristine_base_measures(batches)
        with (
            self.model_for_round(round_ + 1, global_shared, clock) as model,
            self.placement.autocast(),
        ):
            with clock.lap("answer"):
                answers = generate_answers(
                    model,
                    self.tokenizer,
                    self.data.test,
                    self.settings.evaluation.max_new_tokens,
                    self.settings.prompt_room,
                    self.settings.evaluation.eval_batch_size,
                )
            scores = rouge_l(answers, [e.output for e in self.data.test])
            self.store.save_predictions(round_, prediction_rows(self.data.test, answers, scores))
            # the test loss's forward records the final model's routing for the diagnostics
            recording = RoutingRecorder(model) if detailed else contextlib.nullcontext()
            with clock.lap("test_loss"), recording as routing:
                test_loss = mean_loss(model, batches)
            if not math.isfinite(test_loss):
                raise FlexMoEError(
                    f"client {self.client_id}, round {round_}: the test loss is {test_loss}; "
                    "its model is broken"
                )
            details = None
            if detailed:
                with clock.lap("diagnostics"):
                    details = self.measure_diagnostics(model, batches, base, routing.statistics())
        return Evaluation(100 * sum(scores) / len(scores), test_loss, clock.seconds, details)

    def pristine_base_measures(self, batches: list[dict[str, torch.Tensor]]) -> BaseMeasures:
        """The base's measures on the pristine base, for a method that trains its weights: lent
        before the trained model is put on it (it is the base that model is then put on, so two
        full models never share the device), held as the trained one is."""
        with (
            BASE_MODELS.lend(self.settings.model, self.base_placement, False) as pristine,
            self.placement.autocast(),
        ):
            return measure_base(
                pristine, self.tokenizer, batches, self.settings.evaluation.mmlu_per_topic
            )

    def measure_diagnostics(
        self,
        model: FlexModel,
        batches: list[dict[str, torch.Tensor]],
        base: BaseMeasures | None = None,
        routing: RoutingStatistics | None = None,
    ) -> Diagnostics:
        """``flexmoe.evaluation.diagnostics`` of ``model`` beside its base's measures (taken on
        ``model`` computing as its base unless given), with its ``routing`` if recorded."""
        measures = self.store.root.parent / "measures"  # the run's, shared by its clients here
        return diagnostics(
            model,
            self.settings.model,
            self.tokenizer,
            batches,
            measures,
            base,
            self.settings.evaluation.mmlu_per_topic,
            routing,
        )

    @property
    def base_placement(self) -> Placement:
        """Where this client's base is held: as placed, or in float32 when its weights train."""
        trains = self.method.shared.trains_base_weights
        return self.placement.for_trained_weights() if trains else self.placement

    @contextlib.contextmanager
    def model_for_round(
        self, round_: int, global_shared: State, clock: Stopwatch | None = None
    ) -> Iterator[FlexModel]:
        """The latest state saved before ``round_`` (or a fresh graft) with the global
        parameters, on this process's base model for the length of the block.

        ``clock`` times getting the base (``load``) and putting the state on and off it
        (``restore``).
        """
        clock = clock or Stopwatch(self.placement.device)
        trains_weights = self.method.shared.trains_base_weights
        with contextlib.ExitStack() as lending:
            with clock.lap("load"):
                base = lending.enter_context(
                    BASE_MODELS.lend(self.settings.model, self.base_placement, trains_weights)
                )
            with clock.lap("restore"):
                model = self.restored_model(base, round_, global_shared)
            try:
                yield model
            finally:
                with clock.lap("restore"):
                    model.unload()

    def restored_model(self, base: torch.nn.Module, round_: int, global_shared: State) -> FlexModel:
        """``base`` with this client's state saved before ``round_`` (or a fresh graft) and
        the global shared parameters."""
        previous = self.store.latest(before=round_)
        model = (
            self.fresh_model(base)
            if previous is None
            else FlexModel.from_pretrained(base, previous)
        )
        if self.method.federated:
            model.load_state_of(Role.SHARED, global_shared)
        return model

    def fresh_model(self, base: torch.nn.Module) -> FlexModel:
        """The client's model at its first participation: grafted as its method says."""
        torch.manual_seed(self.seed)
        config = FlexConfig(
            **asdict(self.settings.graft),
            selection=self.method.selection,
            seed=self.seed,
            shared=self.method.shared,
        )
        if not self.method.grafts:
            return FlexModel(base, config=config)
        with self.placement.autocast():
            model, _ = FlexModel.graft(base, self.selection_batches(), config)
        return model

    def selection_batches(self) -> list[dict[str, torch.Tensor]]:
        """The first ``selection-examples`` of the client's shuffled training data (scoring the
        tokens ``selection-tokens`` names), or generic text for the generic ablation."""
        graft = self.settings.graft
        examples = self.train_examples[: graft.selection_count]
        if self.method.graft is GraftSource.GENERIC:
            ids = [self.tokenizer.encode(t)[: self.max_length] for t in generic_texts()]
            examples = [TokenizedExample(i, i) for i in ids if i][: graft.selection_count]
        elif graft.selection_tokens != "all":
            examples = tokenize_examples(
                self.data.train[: graft.selection_count],
                self.tokenizer,
                self.max_length,
                selection_tokens=graft.selection_tokens,
            )
        batch_size = self.settings.train.batch_size
        return sequential_batches(examples, batch_size, pad_token_id(self.tokenizer))


def prediction_rows(
    examples: Sequence[InstructionExample], answers: Sequence[str], scores: Sequence[float]
) -> list[dict]:
    """What a client keeps of an evaluation: each test prompt, its reference and its answer."""
    return [
        {
            "prompt_id": example.prompt_id,
            "category": example.category,
            "instruction": example.instruction,
            "input": example.input,
            "reference": example.output,
            "prediction": answer,
            "rouge_l": round(100 * score, 2),
        }
        for example, answer, score in zip(examples, answers, scores, strict=True)
    ]


def _on_host(state: State) -> State:
    """``state`` in host memory, for the reply (the model may sit on an accelerator)."""
    return {name: tensor.cpu() for name, tensor in state.items()}
