"""The messages of a flexmoe federation, encoded and decoded here and nowhere else.

What a *run* is (its ``Settings``) is not sent with every message: as in Flower's own apps it is
the run config (``context.run_config``) that ``flwr run`` hands every ServerApp and ClientApp;
the in-process simulation gives its ClientApp the same settings directly.

What a *round* asks travels in the ``config`` record of each request: ``RoundInstructions`` (where
the client keeps its state, whether to add diagnostics) completed by the strategy, which sets the
server round and, for FedProx only, ``proximal-mu``. So FedProx's mu reaches a client only when
the strategy is FedProx. Replies carry a ``TrainReply`` or an ``EvaluateReply``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from flexmoe.errors import FlexMoEError
from flexmoe.federated.records import WireState, arrays_to_numpy, state_to_arrays
from flexmoe.results import Diagnostics, from_plain, to_plain
from flexmoe.schema import Group, at_least, parsed, setting, typed
from flexmoe.settings import OUT_DIR, Settings

if TYPE_CHECKING:  # a deployed message's process never imports torch (see records)
    import torch

State = dict[str, "torch.Tensor"]
Decoded = TypeVar("Decoded")

# records in a message's content (Flower's strategies read and write the first three)
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"

# the config record of a request: set by the server, then by the strategy
RUN_KEY = "run-key"
STATE_ROOT = "state-root"
DETAILED = "detailed"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
CLIPPING_NORM = "clipping_norm"  # set by Flower's DP wrapper: clip the update to this norm

# the metric record of a reply; Flower's strategies weight their averages by NUM_EXAMPLES
NUM_EXAMPLES = "num-examples"
CLIENT_ID = "client-id"
TRAIN_LOSS = "train_loss"
LEARNING_RATE = "lr"
N_TRAIN = "n-train"
ROUGE_L = "rouge_l"
TEST_LOSS = "test_loss"
SECONDS = "seconds-"  # + a phase of the client's work: load, restore, compute, save
STARTUP = "startup"  # a phase of its own: the process starting, before its first job

# the client record of an evaluate reply
CATEGORIES = "categories"
TEST_IDS = "test-ids"
DIAGNOSTICS = "detail"

# a SuperNode's --node-config
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
STATE_DIR = "state-dir"
WORKER_SOCKET = "worker-socket"
DEVICE = "device"
THREADS = "threads"
DATA = "data"
MIN_BATCH_SIZE = "min-batch-size"
MIN_TEST_SIZE = "min-test-size"
SHARE_DIAGNOSTICS = "share-diagnostics"


# --- the run ---


def run_config_of(settings: Settings, out_dir: str) -> dict[str, Any]:
    """The Flower run config of a run: every setting, and the server's output folder."""
    return {**settings.to_run_config(), OUT_DIR: out_dir}


def split_run_config(run_config: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A Flower run config's settings (``Settings.updated`` reads them) and output folder."""
    values = dict(run_config)
    out_dir = values.pop(OUT_DIR, None)
    return values, None if out_dir is None else str(out_dir)


# --- the node ---


@dataclass(frozen=True)
class NodeLimits(Group):
    """What a node lets the server ask of it. The server chooses batch size, steps and test
    size; at 1 each, a reply's losses would be one example's. A SuperNode's defaults keep every
    reported number an average over several examples and keep diagnostics (category names,
    routing histograms, graft losses) on the node."""

    min_batch_size: int = setting(4, "the least batch-size this node trains with", at_least(1))
    min_test_size: int = setting(8, "the least max-test this node evaluates on", at_least(1))
    share_diagnostics: bool = setting(
        False, "report category names, test ids, knowledge, routing and graft losses"
    )


DEPLOYED = NodeLimits()  # a SuperNode's defaults, which its --node-config may change
SIMULATED = NodeLimits(min_batch_size=1, min_test_size=1, share_diagnostics=True)  # one owner


@dataclass(frozen=True)
class NodeConfig:
    """What a SuperNode says about itself (``--node-config``), read on the node only."""

    partition_id: int
    num_partitions: int | None = None
    state_dir: str | None = None  # node-local folder for personal state
    threads: int = 1  # torch threads of a client process
    worker_socket: str | None = None  # a node worker's socket: jobs go there (deployments)
    device: str | None = None  # this node's device, over the run's (a GPU host among CPU ones)
    data: str | None = None  # this node's own data file, all of it this node's (over the run's)
    limits: NodeLimits = DEPLOYED

    @classmethod
    def from_context(cls, context: Context, defaults: NodeLimits = DEPLOYED) -> NodeConfig:
        node = context.node_config
        if PARTITION_ID not in node:
            raise FlexMoEError(
                "this SuperNode has no partition-id; start it with "
                "--node-config 'partition-id=I num-partitions=N'"
            )
        limits = (MIN_BATCH_SIZE, MIN_TEST_SIZE, SHARE_DIAGNOSTICS)
        given = {key: node[key] for key in limits if key in node}
        return cls(
            partition_id=_whole_number(node, PARTITION_ID),
            num_partitions=_whole_number(node, NUM_PARTITIONS),
            state_dir=str(node[STATE_DIR]) if node.get(STATE_DIR) else None,
            threads=_whole_number(node, THREADS, 1),
            worker_socket=str(node[WORKER_SOCKET]) if node.get(WORKER_SOCKET) else None,
            device=str(node[DEVICE]) if node.get(DEVICE) else None,
            data=str(node[DATA]) if node.get(DATA) else None,
            limits=defaults.updated(given, "node-config "),
        )

    def to_flat(self) -> dict[str, int | str | bool]:
        """The ``--node-config`` values of this node."""
        flat: dict[str, int | str | bool] = {
            PARTITION_ID: self.partition_id,
            THREADS: self.threads,
            MIN_BATCH_SIZE: self.limits.min_batch_size,
            MIN_TEST_SIZE: self.limits.min_test_size,
            SHARE_DIAGNOSTICS: self.limits.share_diagnostics,
        }
        if self.num_partitions is not None:
            flat[NUM_PARTITIONS] = self.num_partitions
        if self.state_dir is not None:
            flat[STATE_DIR] = self.state_dir
        if self.worker_socket is not None:
            flat[WORKER_SOCKET] = self.worker_socket
        if self.device is not None:
            flat[DEVICE] = self.device
        if self.data is not None:
            flat[DATA] = self.data
        return flat


def _whole_number(node: dict[str, Any], key: str, default: int | None = None) -> int | None:
    """A whole number of a node config (text or a number), or ``default`` when it is not set."""
    value = node.get(key, default)
    return None if value is None else typed(key, int, parsed(key, int, value))


# --- a round's request ---


def client_state_dir(state_root: Path, run_key: str, partition_id: int) -> Path:
    """Where client ``partition_id`` keeps its personal state of run ``run_key``."""
    return state_root / run_key / f"client-{partition_id}"


@dataclass(frozen=True)
class RoundInstructions:
    """What the server asks of every client it samples in one round."""

    server_round: int
    run_key: str  # names this run's personal state on the node
    state_root: str  # where personal state goes when the node names no state-dir
    detailed: bool = False  # evaluation: add knowledge, routing and FLOPs diagnostics
    proximal_mu: float = 0.0  # FedProx's mu; set by the FedProx strategy, 0 for every other
    clipping_norm: float | None = None  # set by the DP wrapper of a private run

    def to_record(self) -> ConfigRecord:
        """The server's part of the config record; the strategy adds the round (and FedProx
        its mu) when it builds the messages."""
        return ConfigRecord(
            {RUN_KEY: self.run_key, STATE_ROOT: self.state_root, DETAILED: self.detailed}
        )

    @classmethod
    def from_message(cls, message: Message) -> RoundInstructions:
        record = _part(message, CONFIG, "request")
        return _decoded(
            "request",
            lambda: cls(
                server_round=int(record[SERVER_ROUND]),
                run_key=str(record[RUN_KEY]),
                state_root=str(record[STATE_ROOT]),
                detailed=bool(record.get(DETAILED, False)),
                proximal_mu=float(record.get(PROXIMAL_MU, 0.0)),
                clipping_norm=None if CLIPPING_NORM not in record else float(record[CLIPPING_NORM]),
            ),
        )


def arrays_of(message: Message) -> WireState:
    """The arrays a request carries (the global shared parameters)."""
    return arrays_to_numpy(_part(message, ARRAYS, "request"))


# --- a client's replies ---


@dataclass
class TrainReply:
    """A client's answer to a train request: its shared parameters and what it measured."""

    client_id: int
    num_examples: int
    train_loss: float
    lr: float
    proximal_mu: float  # the FedProx mu it trained with
    seconds: dict[str, float] = field(default_factory=dict)  # by phase of its work
    shared: State | WireState | None = None  # sent, never decoded: the strategy reads it

    def to_content(self) -> RecordDict:
        metrics = {
            NUM_EXAMPLES: self.num_examples,
            CLIENT_ID: self.client_id,
            TRAIN_LOSS: self.train_loss,
            LEARNING_RATE: self.lr,
            PROXIMAL_MU: self.proximal_mu,
            **_seconds_metrics(self.seconds),
        }
        arrays = state_to_arrays(self.shared or {})
        return RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics)})

    @classmethod
    def from_message(cls, message: Message) -> TrainReply:
        metrics = _part(message, METRICS, "train reply")
        return _decoded(
            "train reply",
            lambda: cls(
                client_id=int(metrics[CLIENT_ID]),
                num_examples=int(metrics[NUM_EXAMPLES]),
                train_loss=float(metrics[TRAIN_LOSS]),
                lr=float(metrics[LEARNING_RATE]),
                proximal_mu=float(metrics[PROXIMAL_MU]),
                seconds=_seconds_of(metrics),
            ),
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
    test_ids: list[str]  # the prompt ids of the examples it scored, in order
    seconds: dict[str, float] = field(default_factory=dict)  # by phase of its work
    diagnostics: Diagnostics | None = None  # when the request was detailed

    def to_content(self) -> RecordDict:
        metrics = {
            NUM_EXAMPLES: self.n_test,
            CLIENT_ID: self.client_id,
            N_TRAIN: self.n_train,
            ROUGE_L: self.rouge_l,
            TEST_LOSS: self.test_loss,
            **_seconds_metrics(self.seconds),
        }
        client = {
            CATEGORIES: list(self.categories),
            TEST_IDS: list(self.test_ids),
            DIAGNOSTICS: json.dumps(to_plain(self.diagnostics)),
        }
        return RecordDict({METRICS: MetricRecord(metrics), CLIENT: ConfigRecord(client)})

    @classmethod
    def from_message(cls, message: Message) -> EvaluateReply:
        metrics = _part(message, METRICS, "evaluate reply")
        client = _part(message, CLIENT, "evaluate reply")

        def decode() -> EvaluateReply:
            diagnostics = json.loads(str(client[DIAGNOSTICS]))
            return cls(
                client_id=int(metrics[CLIENT_ID]),
                n_train=int(metrics[N_TRAIN]),
                n_test=int(metrics[NUM_EXAMPLES]),
                rouge_l=float(metrics[ROUGE_L]),
                test_loss=float(metrics[TEST_LOSS]),
                categories=[str(c) for c in client[CATEGORIES]],
                test_ids=[str(i) for i in client[TEST_IDS]],
                seconds=_seconds_of(metrics),
                diagnostics=None
                if diagnostics is None
                else from_plain(Diagnostics, diagnostics, "an evaluate reply"),
            )

        return _decoded("evaluate reply", decode)


def _seconds_metrics(seconds: dict[str, float]) -> dict[str, float]:
    return {SECONDS + phase: float(value) for phase, value in seconds.items()}


def _seconds_of(metrics: MetricRecord) -> dict[str, float]:
    return {k.removeprefix(SECONDS): float(v) for k, v in metrics.items() if k.startswith(SECONDS)}


def _part(message: Message, name: str, kind: str) -> Any:
    if name not in message.content:
        raise FlexMoEError(f"a {kind} has no {name!r} record; are both sides the same flexmoe?")
    return message.content[name]


def _decoded(kind: str, decode: Callable[[], Decoded]) -> Decoded:
    """``decode()``, with a missing or malformed value as one error naming the message kind."""
    try:
        return decode()
    except KeyError as missing:
        raise FlexMoEError(
            f"a {kind} has no {missing} value; are both sides the same flexmoe?"
        ) from None
    except (TypeError, ValueError) as error:
        raise FlexMoEError(f"a {kind} holds a malformed value ({error})") from None
