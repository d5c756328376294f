"""Flower strategies for each method, and their state for checkpoints."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from flexmoe.methods import Aggregation, Method
from flexmoe.settings import FederationSettings, PrivacySettings, Settings, TrainSettings

# Server-optimiser settings of OpenFedLLM, the code base the paper builds on (eta: server-lr).
TAU = 1e-3
ADAPTIVE_BETAS = {"beta_1": 0.9, "beta_2": 0.99}
SERVER_MOMENTUM = 0.9
STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")


def make_strategy(settings: Settings) -> Strategy:
    """The strategy that aggregates the method's shared parameters (FedAvg when none are),
    wrapped in Flower's client-side fixed-clipping DP when the run is private."""
    strategy = _aggregation(settings.chosen_method(), settings.federation, settings.train)
    if not settings.privacy.enabled:
        return strategy
    return _with_privacy(strategy, settings.federation.clients, settings.privacy)


def _aggregation(method: Method, federation: FederationSettings, train: TrainSettings) -> FedAvg:
    common = {
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": 1.0,
        # Flower sizes a sample from the nodes connected so far: state the size outright.
        "min_train_nodes": max(1, math.floor(federation.fraction_train * federation.clients)),
        "min_evaluate_nodes": federation.clients,
        "min_available_nodes": federation.clients,
    }
    if not method.federated:
        return FedAvg(**common)  # configures the rounds; nothing is aggregated
    if federation.aggregation == "median":
        return FedMedian(**common)
    if federation.aggregation == "trimmed-mean":
        return FedTrimmedAvg(**common, beta=federation.trim_fraction)
    options = _own_options(method.aggregation, federation, train)
    return STRATEGIES[method.aggregation](**common, **options)


STRATEGIES: dict[Aggregation, type[FedAvg]] = {
    Aggregation.FEDAVG: FedAvg,
    Aggregation.FEDPROX: FedProx,
    Aggregation.FEDAVGM: FedAvgM,
    Aggregation.FEDADAM: FedAdam,
    Aggregation.FEDYOGI: FedYogi,
    Aggregation.FEDADAGRAD: FedAdagrad,
}


def _own_options(
    aggregation: Aggregation, federation: FederationSettings, train: TrainSettings
) -> dict[str, float]:
    """A strategy's settings beyond FedAvg's: FedProx's mu, FedAvgM's momentum, a server
    optimiser's rates (eta is the server's; eta_l, the clients', is recorded only)."""
    rates = {"eta": federation.server_lr, "eta_l": train.lr, "tau": TAU}
    return {
        Aggregation.FEDPROX: {"proximal_mu": federation.proximal_mu},
        Aggregation.FEDAVGM: {"server_momentum": SERVER_MOMENTUM},
        Aggregation.FEDADAM: {**rates, **ADAPTIVE_BETAS},
        Aggregation.FEDYOGI: {**rates, **ADAPTIVE_BETAS},
        Aggregation.FEDADAGRAD: rates,
    }.get(aggregation, {})


def _with_privacy(strategy: FedAvg, clients: int, privacy: PrivacySettings) -> Strategy:
    """``strategy`` with each client's update clipped to ``dp-clipping-norm`` (by the clients'
    mod) and Gaussian noise of ``dp-noise-multiplier`` x that norm over the clients averaged
    added to the aggregate, the privacy spent accounted by Flower's RDP accountant.

    What is clipped and noised is what is federated: the shared parameters, and only them.
    Which methods may be private the settings check (``Settings``): FedAvg's mean only.
    """
    accountant = None
    if privacy.dp_noise_multiplier > 0:
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=privacy.dp_delta,
                population_size=clients,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,  # no credit for sampling
            )
        )
    return DifferentialPrivacyClientSideFixedClipping(
        strategy,
        privacy.dp_noise_multiplier,
        privacy.dp_clipping_norm,
        strategy.min_train_nodes,  # the clients sampled each round
        accountant=accountant,
    )


def averages(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates FedAvg's example-weighted mean of the updates (and then
    perhaps a server step), with no privacy wrapper that must see each update."""
    return type(strategy) in STRATEGIES.values()


def aggregator(strategy: Strategy) -> FedAvg:
    """The strategy that aggregates, inside a privacy wrapper if there is one."""
    return getattr(strategy, "strategy", strategy)


def accountant_of(strategy: Strategy) -> RdpAccountant | None:
    """The privacy accountant of a private run's strategy (with noise), else None."""
    return getattr(strategy, "accountant", None)


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's server-side optimiser state, flattened to named arrays."""
    strategy = aggregator(strategy)
    state = {}
    for attribute in STATE_ATTRIBUTES:
        value = getattr(strategy, attribute, None)
        if isinstance(value, ArrayRecord):
            value = {k: a.numpy() for k, a in value.items()}
        if isinstance(value, list):
            value = {str(i): v for i, v in enumerate(value)}
        for key, array in (value or {}).items():
            state[f"{attribute}/{key}"] = np.ascontiguousarray(array)
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Put back what ``strategy_state`` took, in the types the strategy keeps."""
    strategy = aggregator(strategy)
    for attribute in STATE_ATTRIBUTES:
        prefix = f"{attribute}/"
        values = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not values:
            continue
        if attribute == "momentum_vector":
            restored = [values[str(i)] for i in range(len(values))]
        elif attribute == "current_arrays" and isinstance(strategy, FedAvgM):
            restored = ArrayRecord({k: Array(v) for k, v in values.items()})
        else:
            restored = values
        setattr(strategy, attribute, restored)
