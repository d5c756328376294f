"""Flower strategies for each method, and their state for checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable

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

from flexmoe.errors import FlexMoEError
from flexmoe.methods import Aggregation, Method
from flexmoe.runconfig import RunConfig

# Server-optimiser settings of OpenFedLLM, the code base the paper builds on (eta: server-lr).
TAU = 1e-3
ADAPTIVE_BETAS = {"beta_1": 0.9, "beta_2": 0.99}
SERVER_MOMENTUM = 0.9
STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")


def make_strategy(method: Method, config: RunConfig) -> Strategy:
    """The strategy that aggregates ``method``'s shared parameters (FedAvg when none are),
    wrapped in Flower's client-side fixed-clipping DP when the run is private."""
    strategy = _aggregation(method, config)
    return _with_privacy(strategy, method, config) if config.private else strategy


def _aggregation(method: Method, config: RunConfig) -> FedAvg:
    common = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": 1.0,
        # Flower sizes a sample from the nodes connected so far: state the size outright.
        "min_train_nodes": max(1, math.floor(config.fraction_train * config.clients)),
        "min_evaluate_nodes": config.clients,
        "min_available_nodes": config.clients,
    }
    if not method.federated:
        return FedAvg(**common)  # configures the rounds; nothing is aggregated
    if config.aggregation != "mean":
        if method.aggregation is not Aggregation.FEDAVG:
            raise FlexMoEError(
                f"aggregation={config.aggregation} replaces FedAvg's mean, and {method.name} "
                "aggregates with its own server optimiser; use aggregation=mean"
            )
        if config.aggregation == "median":
            return FedMedian(**common)
        return FedTrimmedAvg(**common, beta=config.trim_fraction)
    return STRATEGIES[method.aggregation](common, config)


STRATEGIES: dict[Aggregation, Callable[[dict, RunConfig], FedAvg]] = {
    Aggregation.FEDAVG: lambda common, _: FedAvg(**common),
    Aggregation.FEDPROX: lambda common, c: FedProx(**common, proximal_mu=c.proximal_mu),
    Aggregation.FEDAVGM: lambda common, _: FedAvgM(**common, server_momentum=SERVER_MOMENTUM),
    Aggregation.FEDADAM: lambda common, c: FedAdam(**common, **_fedopt(c), **ADAPTIVE_BETAS),
    Aggregation.FEDYOGI: lambda common, c: FedYogi(**common, **_fedopt(c), **ADAPTIVE_BETAS),
    Aggregation.FEDADAGRAD: lambda common, c: FedAdagrad(**common, **_fedopt(c)),
}


def _fedopt(config: RunConfig) -> dict[str, float]:
    """A server optimiser's rates: eta is the server's, eta_l (recorded only) the clients'."""
    return {"eta": config.server_lr, "eta_l": config.lr, "tau": TAU}


def _with_privacy(strategy: FedAvg, method: Method, config: RunConfig) -> Strategy:
    """``strategy`` with each client's update clipped to ``dp-clipping-norm`` (by the clients'
    mod) and Gaussian noise of ``dp-noise-multiplier`` x that norm over the clients averaged
    added to the aggregate, the privacy spent accounted by Flower's RDP accountant.

    What is clipped and noised is what is federated: the shared parameters, and only them.
    """
    if not method.federated:
        raise FlexMoEError(f"{method.name} federates nothing, so it has nothing to make private")
    if type(strategy).aggregate_train is not FedAvg.aggregate_train:
        raise FlexMoEError(
            f"differential privacy is accounted for FedAvg's mean; {method.name} with "
            f"aggregation={config.aggregation} aggregates otherwise"
        )
    accountant = None
    if config.dp_noise_multiplier > 0:
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=config.dp_delta,
                population_size=config.clients,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,  # no credit for sampling
            )
        )
    return DifferentialPrivacyClientSideFixedClipping(
        strategy,
        config.dp_noise_multiplier,
        config.dp_clipping_norm,
        strategy.min_train_nodes,  # the clients sampled each round
        accountant=accountant,
    )


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
