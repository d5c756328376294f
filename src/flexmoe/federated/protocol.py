"""The messages of a flexmoe federation, encoded and decoded here and nowhere else.

What a *run* is (its ``RunConfig``) is not sent with every message: as in Flower's own apps it is
the run config (``context.run_config``) that ``flwr run`` hands every ServerApp and ClientApp;
the in-process simulation gives its ClientApp the same settings directly.

What a *round* asks travels in the ``config`` record of each message: ``RoundInstructions``
(the server round, where the client keeps its state, whether to add diagnostics) plus what the
strategy itself adds, such as FedProx's ``proximal-mu``, which therefore reaches a client only
when the strategy is FedProx. Replies carry ``TrainReply`` or ``EvaluateReply``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flexmoe.errors import FlexMoEError
from flexmoe.federated.records import arrays_to_state, state_to_arrays
from flexmoe.runconfig import RunConfig

# record names in a message's content (the first two are Flower strategies' defaults)
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"

# keys Flower's strategies write into the config record
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
# the metric Flower's strategies weight an average by
NUM_EXAMPLES = "num-examples"

OUT_DIR = "out-dir"  # the server's output folder: a run-config key that is not a RunConfig field

State = dict[str, torch.Tensor]


# --- the run ---


def run_config_of(config: RunConfig, out_dir: str) -> dict[str, Any]:
    """The Flower run config of a run: every setting, and the server's output folder."""
    return {**config.to_flat(), OUT_DIR: out_dir}


def settings_from_run_config(run_config: dict[str, Any]) -> tuple[RunConfig, str | None]:
    """The run's settings and output folder from a Flower run config."""
    values = dict(run_config)
    out_dir = values.pop(OUT_DIR, None)
    return RunConfig().updated(values), None if out_dir is None else str(out_dir)


# --- the node ---


@dataclass(frozen=True)
class NodeConfig:
    """What a SuperNode says about itself (``--node-config``), read on the node only."""

    partition_id: int
    num_partitions: int | None = None
    state_dir: str | None = None  # node-local folder for personal state
    threads: int = 1  # torch threads of a client process

    @classmethod
    def from_context(cls, context: Context) -> NodeConfig:
        node = context.node_config
        if "partition-id" not in node:
            raise FlexMoEError(
                "this SuperNode has no partition-id; start it with "
                "--node-config 'partition-id=I num-partitions=N'"
            )
        partitions = node.get("num-partitions")
        return cls(
            partition_id=int(node["partition-id"]),
            num_partitions=None if partitions is None else int(partitions),
            state_dir=str(node["state-dir"]) if node.get("state-dir") else None,
            threads=int(node.get("threads", 1)),
        )

    def to_flat(self) -> dict[str, int | str]:
        """The ``--node-config`` values of this node."""
        flat: dict[str, int | str] = {"partition-id": self.partition_id, "threads": self.threads}
        if self.num_partitions is not None:
            flat["num-partitions"] = self.num_partitions
        if self.state_dir is not None:
            flat["state-dir"] = self.state_dir
        return flat


# --- a round's request ---


@dataclass(frozen=True)
class RoundInstructions:
    """What the server asks of every client it samples in one round."""

    server_round: int
    run_key: str  # names this run's personal state on the node
    state_root: str  # where personal state goes when the node names no state-dir
    detailed: bool = False  # evaluation: add knowledge, routing and FLOPs diagnostics
    proximal_mu: float = 0.0  # FedProx's mu; set by the FedProx strategy, 0 for every other

    def to_record(self) -> ConfigRecord:
        """The config record a strategy completes (it sets the round, FedProx its mu)."""
        return ConfigRecord(
            {"run-key": self.run_key, "state-root": self.state_root, "detailed": self.detailed}
        )

    @classmethod
    def from_message(cls, message: Message) -> RoundInstructions:
        record = message.content[CONFIG]
        try:
            return cls(
                server_round=int(record[SERVER_ROUND]),
                run_key=str(record["run-key"]),
                state_root=str(record["state-root"]),
                detailed=bool(record.get("detailed", False)),
                proximal_mu=float(record.get(PROXIMAL_MU, 0.0)),
            )
        except KeyError as missing:
            raise FlexMoEError(f"the server's message has no {missing} setting") from None


def request_content(arrays: ArrayRecord, instructions: RoundInstructions) -> RecordDict:
    """A request's content as a strategy builds it (for clients driven without a strategy)."""
    record = instructions.to_record()
    record[SERVER_ROUND] = instructions.server_round
    if instructions.proximal_mu:
        record[PROXIMAL_MU] = instructions.proximal_mu
    return RecordDict({ARRAYS: arrays, CONFIG: record})


# --- a client's replies ---


@dataclass
class TrainReply:
    """A client's answer to a train request: its shared parameters and what it measured."""

    client_id: int
    num_examples: int
    train_loss: float
    lr: float
    proximal_mu: float
    shared: State = field(default_factory=dict)

    def to_content(self) -> RecordDict:
        metrics = {
            NUM_EXAMPLES: self.num_examples,
            "client-id": self.client_id,
            "train_loss": self.train_loss,
            "lr": self.lr,
            PROXIMAL_MU: self.proximal_mu,
        }
        return RecordDict({ARRAYS: state_to_arrays(self.shared), METRICS: MetricRecord(metrics)})

    @classmethod
    def from_message(cls, message: Message) -> TrainReply:
        """The reply's record (its arrays stay in the message, for the strategy)."""
        metrics = message.content[METRICS]
        return cls(
            client_id=int(metrics["client-id"]),
            num_examples=int(metrics[NUM_EXAMPLES]),
            train_loss=float(metrics["train_loss"]),
            lr=float(metrics["lr"]),
            proximal_mu=float(metrics[PROXIMAL_MU]),
        )


@dataclass
class EvaluateReply:
    """A client's answer to an evaluate request: scores of the model it would use."""

    client_id: int
    n_train: int
    n_test: int
    rouge_l: float
    test_loss: float
    categories: list[str]
    detail: dict = field(default_factory=dict)

    def to_content(self) -> RecordDict:
        metrics = {
            NUM_EXAMPLES: self.n_test,
            "client-id": self.client_id,
            "n-train": self.n_train,
            "rouge_l": self.rouge_l,
            "test_loss": self.test_loss,
        }
        client = {"categories": list(self.categories), "detail": json.dumps(self.detail)}
        return RecordDict({METRICS: MetricRecord(metrics), CLIENT: ConfigRecord(client)})

    @classmethod
    def from_message(cls, message: Message) -> EvaluateReply:
        metrics, client = message.content[METRICS], message.content[CLIENT]
        return cls(
            client_id=int(metrics["client-id"]),
            n_train=int(metrics["n-train"]),
            n_test=int(metrics[NUM_EXAMPLES]),
            rouge_l=float(metrics["rouge_l"]),
            test_loss=float(metrics["test_loss"]),
            categories=[str(c) for c in client["categories"]],
            detail=json.loads(str(client["detail"])),
        )


def arrays_of(message: Message) -> State:
    """The tensors a request carries (the global shared parameters)."""
    return arrays_to_state(message.content[ARRAYS])
