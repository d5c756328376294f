"""The methods a federation can run: FLEx, its ablations and its baselines, in one table."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexmoe.errors import FlexMoEError
from flexmoe.roles import SharedConfig

GRAFT_KINDS = ("none", "local", "random", "generic")


@dataclass(frozen=True)
class Method:
    """What a client grafts, what it shares, and how the server aggregates."""

    name: str
    strategy: str  # a Flower strategy name, or "none" when nothing is aggregated
    graft: str = "none"  # where the grafted expert comes from
    shared: SharedConfig = field(default_factory=SharedConfig)
    description: str = ""

    @property
    def federated(self) -> bool:
        return self.strategy != "none"


def _lora_baseline(strategy: str) -> Method:
    return Method(strategy, strategy, description=f"attention LoRA aggregated by {strategy}")


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("flex", "fedavg", "local", description="FLEx: expert grafted from local data"),
        Method("flex-random", "fedavg", "random", description="FLEx with a random expert"),
        Method("flex-generic", "fedavg", "generic", description="FLEx, expert from generic text"),
        *(
            _lora_baseline(s)
            for s in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
        ),
        Method(
            "fedavg-full",
            "fedavg",
            shared=SharedConfig(mode="all"),
            description="naive dense FL: every weight, experts included, trained and averaged",
        ),
        Method(
            "fedsa-lora",
            "fedavg",
            shared=SharedConfig(personal_lora_b=True),
            description="FedSA-LoRA: LoRA A federated, LoRA B personal",
        ),
        Method("local", "none", description="no federation: each client trains alone"),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FlexMoEError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
