"""The methods a federation can run: FLEx, its ablations and its baselines, in one table."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from flexmoe.errors import FlexMoEError
from flexmoe.flex.sharing import SharedConfig


class GraftSource(StrEnum):
    """Where a client's personal experts come from."""

    NONE = "none"  # no grafted expert
    LOCAL = "local"  # the reconstruction criterion on the client's own data (FLEx)
    RANDOM = "random"  # drawn at random
    GENERIC = "generic"  # the reconstruction criterion on generic English text


class Aggregation(StrEnum):
    """The Flower strategy that aggregates a method's shared parameters."""

    NONE = "none"  # nothing is federated
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"


@dataclass(frozen=True)
class Method:
    """What a client grafts, what it shares, and how the server aggregates."""

    name: str
    aggregation: Aggregation
    graft: GraftSource = GraftSource.NONE
    shared: SharedConfig = field(default_factory=SharedConfig)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "aggregation", Aggregation(self.aggregation))
        object.__setattr__(self, "graft", GraftSource(self.graft))

    def with_lora_rank(self, rank: int) -> Method:
        """This method with its shared LoRA at ``rank`` (alpha 2 x rank, as the paper's 32/64)."""
        return replace(self, shared=replace(self.shared, lora_r=rank, lora_alpha=2 * rank))

    @property
    def federated(self) -> bool:
        """Whether a server aggregates anything (``local`` trains alone)."""
        return self.aggregation is not Aggregation.NONE

    @property
    def averages(self) -> bool:
        """Whether its server takes FedAvg's weighted mean of the updates (FedProx's too): the
        aggregate differential privacy is accounted for."""
        return self.aggregation in (Aggregation.FEDAVG, Aggregation.FEDPROX)

    @property
    def grafts(self) -> bool:
        return self.graft is not GraftSource.NONE

    @property
    def personalises(self) -> bool:
        """Whether each client keeps a model of its own: a graft, personal LoRA, or all of it."""
        return self.grafts or not self.federated or self.shared.personal_lora_b

    @property
    def selection(self) -> str:
        """The selection strategy its grafts use (see ``flexmoe.flex.selection``)."""
        return "random" if self.graft is GraftSource.RANDOM else "top"


def _lora_baseline(aggregation: Aggregation) -> Method:
    name = aggregation.value
    return Method(name, aggregation, description=f"attention LoRA aggregated by {name}")


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "flex",
            Aggregation.FEDAVG,
            GraftSource.LOCAL,
            description="FLEx: expert grafted from local data",
        ),
        Method(
            "flex-random",
            Aggregation.FEDAVG,
            GraftSource.RANDOM,
            description="FLEx with a random expert",
        ),
        Method(
            "flex-generic",
            Aggregation.FEDAVG,
            GraftSource.GENERIC,
            description="FLEx, expert from generic text",
        ),
        *(_lora_baseline(a) for a in Aggregation if a is not Aggregation.NONE),
        Method(
            "fedavg-full",
            Aggregation.FEDAVG,
            shared=SharedConfig(mode="all"),
            description="naive dense FL: every weight, experts included, trained and averaged",
        ),
        Method(
            "fedsa-lora",
            Aggregation.FEDAVG,
            shared=SharedConfig(personal_lora_b=True),
            description="FedSA-LoRA: LoRA A federated, LoRA B personal",
        ),
        Method("local", Aggregation.NONE, description="no federation: each client trains alone"),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FlexMoEError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
