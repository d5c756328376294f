"""What a run writes: its file names and the records of ``results.json`` and ``rounds.json``.

Defined once: the federation writes through these records, the report and the benchmark read
through them, and the tests build their fixtures with them. A field that is ``None`` is left out
of the file (not measured), and a file from an older run that lacks a newer field reads as
``None`` there.
"""

from __future__ import annotations

import json
import statistics
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_text, read_json

RESULTS_FILE = "results.json"
ROUNDS_FILE = "rounds.json"
DATA_FILE = "data.json"  # per category: examples used, inputs and answers cut to fit
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_DIR = "checkpoints"
CLIENTS_DIR = "clients"


# --- rounds.json: one record per round ---


@dataclass(kw_only=True)
class ClientRound:
    """One client's part in one training round."""

    client_id: int
    bytes_up: int
    bytes_down: int
    train_loss: float
    proximal_mu: float | None = None  # the FedProx mu it trained with (None: not recorded)
    # load, restore, compute, save; and startup, for a process's first message (see the app)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class RejectedUpdate:
    """A client's update the server refused to aggregate."""

    client_id: int
    reason: str


@dataclass(kw_only=True)
class RoundRecord:
    """One training round as the server saw it."""

    round: int
    lr: float
    mean_train_loss: float
    bytes_up: int
    bytes_down: int
    wall_s: float
    clients: list[ClientRound]
    mean_rouge_l: float | None = None  # when the round was also scored (eval-every)
    client_rouge_l: dict[str, float] = field(default_factory=dict)  # client id -> its ROUGE-L
    rejected: list[RejectedUpdate] = field(default_factory=list)  # updates left out, and why
    dp_epsilon: float | None = None  # privacy spent up to this round (private runs with noise)

    @property
    def client_seconds(self) -> float:
        """The longest client's work in this round (its process starting aside): the round's
        wall time were the clients all in parallel and Flower free."""
        return max((work_seconds(c.seconds) for c in self.clients), default=0.0)

    @property
    def startup_seconds(self) -> float:
        """The longest time a client's process took to start before its job, this round."""
        return max((c.seconds.get("startup", 0.0) for c in self.clients), default=0.0)


def work_seconds(seconds: dict[str, float]) -> float:
    """A client's seconds at its own work: every phase but its process's start."""
    return sum(value for phase, value in seconds.items() if phase != "startup")


# --- results.json: the run's final evaluation ---


@dataclass(kw_only=True)
class MMLUScore:
    """MMLU 0-shot on a fixed subset: accuracy, and the probability given to the right letter
    (softmax over the four), which moves even where accuracy sits at chance."""

    questions: int
    accuracy: float
    macro_accuracy: float  # mean of the per-topic accuracies
    correct_probability: float


@dataclass(kw_only=True)
class Knowledge:
    """Held-out perplexity per pretraining domain of a client's model and of the base model,
    and their MMLU scores when the run measured them."""

    heldout_ppl: dict[str, float]
    heldout_ppl_base: dict[str, float]
    mmlu: MMLUScore | None = None
    mmlu_base: MMLUScore | None = None

    @property
    def increase(self) -> float:
        """Mean relative increase of held-out perplexity over the base model."""
        base = self.heldout_ppl_base
        return statistics.fmean(self.heldout_ppl[d] / base[d] - 1 for d in base)


@dataclass(kw_only=True)
class FlopsPerToken:
    """MoE FLOPs per token of the base model and of the personalised one."""

    base: float
    personalised: float
    ratio: float


@dataclass(kw_only=True)
class LayerRouting:
    """Routing of one MoE layer over a client's test tokens (see flexmoe.evaluation.routing)."""

    layer: int
    num_experts: int
    top_k: int
    tokens: int
    utilisation: list[float]  # share of all top-k assignments per expert
    token_entropy: float  # mean entropy (nats) of each token's routing distribution
    utilisation_entropy: float
    max_entropy: float
    gate_means: list[float]  # mean sigmoid gate of each grafted expert


@dataclass(kw_only=True)
class RoutingStatistics:
    layers: list[LayerRouting]


@dataclass(kw_only=True)
class Routing:
    """Routing of the base model and of the client's final model on the same tokens."""

    base: RoutingStatistics
    final: RoutingStatistics


@dataclass(kw_only=True)
class Diagnostics:
    """What personalisation costs a client's model, each beside the base model's."""

    knowledge: Knowledge
    routing: Routing
    flops_per_token: FlopsPerToken
    grafted_experts: dict[str, list[int]]  # MoE layer -> source experts
    graft_losses: dict[str, list[float]] = field(default_factory=dict)  # layer -> L({e}) per expert


@dataclass(kw_only=True)
class ClientResult:
    """One client's final scores, the diagnostics of its model, and its traffic."""

    client_id: int
    categories: list[str]
    n_train: int
    n_test: int
    rouge_l: float
    test_loss: float
    test_ids: list[str] = field(default_factory=list)  # prompt ids of the examples scored
    knowledge: Knowledge | None = None  # the Diagnostics, when the evaluation measured them
    routing: Routing | None = None
    flops_per_token: FlopsPerToken | None = None
    grafted_experts: dict[str, list[int]] | None = None
    graft_losses: dict[str, list[float]] | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    # the final evaluation's seconds: load, restore, answer, test_loss and diagnostics
    eval_seconds: dict[str, float] = field(default_factory=dict)

    def with_diagnostics(self, diagnostics: Diagnostics | None) -> ClientResult:
        if diagnostics is None:
            return self
        return replace(self, **{f.name: getattr(diagnostics, f.name) for f in fields(diagnostics)})


@dataclass(kw_only=True)
class RoundTraffic:
    round: int
    bytes_up: int
    bytes_down: int


@dataclass(kw_only=True)
class Traffic:
    """Bytes of every training message, as serialised on the wire."""

    bytes_up: int
    bytes_down: int
    per_round: list[RoundTraffic] = field(default_factory=list)


@dataclass(kw_only=True)
class RougePoint:
    round: int
    mean_rouge_l: float
    clients: dict[str, float] = field(default_factory=dict)  # client id -> its ROUGE-L


@dataclass(kw_only=True)
class Privacy:
    """What a private run promised: client-level (epsilon, delta)-DP of what it federated."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    epsilon: float | None  # None without noise: clipping alone bounds no privacy loss


@dataclass(kw_only=True)
class RunResults:
    """``results.json``: what a finished run scored, cost and was configured with."""

    method: str
    split: str | None = None
    alpha: float | None = None
    seed: int | None = None
    rounds: int | None = None
    clients: list[ClientResult]
    mean_rouge_l: float
    mean_test_loss: float | None = None
    rouge_per_round: list[RougePoint] = field(default_factory=list)
    mean_ppl_increase: float | None = None
    flops_ratio: float | None = None
    comm: Traffic
    wall_s: float | None = None
    config: dict[str, Any] | None = None  # the settings, by their flat names
    privacy: Privacy | None = None  # for private runs
    regrafted: dict[str, int] = field(default_factory=dict)  # client -> round it started afresh

    @classmethod
    def summarise(
        cls,
        config: dict[str, Any],
        history: list[RoundRecord],
        clients: list[ClientResult],
        wall_s: float,
        regrafted: dict[str, int] | None = None,
    ) -> RunResults:
        """The results of a run whose rounds were ``history`` and whose clients scored
        ``clients``; each client's traffic is summed over the rounds."""
        clients = [_with_traffic(client, history) for client in clients]
        mean_rouge = statistics.fmean(c.rouge_l for c in clients)
        final_round = history[-1].round if history else 0
        scored = [
            RougePoint(round=r.round, mean_rouge_l=r.mean_rouge_l, clients=r.client_rouge_l)
            for r in history
        ]
        knowledge = [c.knowledge for c in clients]
        flops = [c.flops_per_token for c in clients]
        return cls(
            method=config["method"],
            split=config["split"],
            alpha=config["alpha"],
            seed=config["seed"],
            rounds=final_round,
            clients=clients,
            mean_rouge_l=mean_rouge,
            mean_test_loss=statistics.fmean(c.test_loss for c in clients),
            rouge_per_round=[p for p in scored if p.mean_rouge_l is not None]
            + [
                RougePoint(
                    round=final_round,
                    mean_rouge_l=mean_rouge,
                    clients={str(c.client_id): c.rouge_l for c in clients},
                )
            ],
            mean_ppl_increase=None
            if None in knowledge
            else statistics.fmean(k.increase for k in knowledge),
            flops_ratio=None if None in flops else statistics.fmean(f.ratio for f in flops),
            comm=Traffic(
                bytes_up=sum(r.bytes_up for r in history),
                bytes_down=sum(r.bytes_down for r in history),
                per_round=[
                    RoundTraffic(round=r.round, bytes_up=r.bytes_up, bytes_down=r.bytes_down)
                    for r in history
                ],
            ),
            wall_s=round(wall_s, 2),
            config=config,
            privacy=_privacy(config, history),
            regrafted=regrafted or {},
        )


def _privacy(config: dict[str, Any], history: list[RoundRecord]) -> Privacy | None:
    if not config.get("dp_clipping_norm"):
        return None
    return Privacy(
        noise_multiplier=config["dp_noise_multiplier"],
        clipping_norm=config["dp_clipping_norm"],
        delta=config["dp_delta"],
        epsilon=history[-1].dp_epsilon if history else None,
    )


def _with_traffic(client: ClientResult, history: list[RoundRecord]) -> ClientResult:
    """``client`` with its bytes summed over the rounds it took part in."""
    rounds = [c for r in history for c in r.clients if c.client_id == client.client_id]
    return replace(
        client,
        bytes_up=sum(c.bytes_up for c in rounds),
        bytes_down=sum(c.bytes_down for c in rounds),
    )


# --- checkpoint.json: where the server stands between rounds ---


@dataclass(kw_only=True)
class Checkpoint:
    """What the server saves after every round, besides the arrays under ``checkpoints/``."""

    run_id: str = ""  # made when the run starts; names its clients' personal state
    config: dict[str, Any]  # the settings, by their flat names (Settings.to_record)
    round: int = 0
    history: list[RoundRecord] = field(default_factory=list)
    wall_s: float = 0.0
    random_state: list | None = None  # Python's random state, for node sampling
    privacy_state: dict[str, Any] | None = None  # the privacy accountant's, for private runs
    regrafted: dict[str, int] = field(default_factory=dict)  # client -> round it started afresh

    @property
    def tag(self) -> str:
        """Names the arrays of this round under ``checkpoints/``."""
        return f"round-{self.round:04d}"

    def arrays_path(self, out: Path, kind: str) -> Path:
        """Where the run in ``out`` keeps this round's ``kind`` arrays (shared, strategy)."""
        return out / CHECKPOINT_DIR / f"{kind}-{self.tag}.safetensors"


def saved_arrays(out: Path, kind: str) -> dict[int, Path]:
    """The ``kind`` arrays the run in ``out`` keeps (``Checkpoint.arrays_path``), by round, in
    round order."""
    prefix = f"{kind}-round-"
    paths = (out / CHECKPOINT_DIR).glob(f"{prefix}*.safetensors")
    return dict(sorted((int(path.stem.removeprefix(prefix)), path) for path in paths))


# --- files ---


def write_results(folder: Path, results: RunResults) -> Path:
    return _write_json(folder / RESULTS_FILE, results)


def read_results(path: Path) -> RunResults:
    """A results.json, or one error naming the file and what is wrong with it."""
    return from_plain(RunResults, read_json(path, "give a folder of 'flexmoe run' outputs"), path)


def write_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    return _write_json(folder / CHECKPOINT_FILE, checkpoint)


def read_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint saved in ``folder``, or one error naming the file."""
    path = folder / CHECKPOINT_FILE
    data = read_json(path, "give the output folder of an earlier 'flexmoe run'")
    return from_plain(Checkpoint, data, path)


def write_rounds(folder: Path, history: list[RoundRecord]) -> Path:
    return _write_json(folder / ROUNDS_FILE, history)


def read_rounds(path: Path) -> list[RoundRecord]:
    """A rounds.json, or one error naming the file."""
    records = read_json(path, "give a folder of 'flexmoe run' outputs", kind=list)
    return [from_plain(RoundRecord, r, path) for r in records]


def _write_json(path: Path, records: Any) -> Path:
    """Strict JSON (no NaN or Infinity, which JSON does not have), written atomically."""
    try:
        text = json.dumps(to_plain(records), indent=2, allow_nan=False)
    except ValueError:
        raise FlexMoEError(f"{str(path)!r} would hold a non-finite number; not written") from None
    return atomic_write_text(path, text)


# --- records <-> JSON values ---

Record = TypeVar("Record")


def to_plain(value: Any) -> Any:
    """JSON values for records (fields that are None left out), lists and dicts of them."""
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_plain(getattr(value, f.name))
            for f in fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def from_plain(cls: type[Record], data: Any, source: Path | str) -> Record:
    """A ``cls`` record from the JSON values ``to_plain`` made; an error names ``source``."""
    if not isinstance(data, dict):
        raise FlexMoEError(f"{str(source)!r}: expected a {cls.__name__} object, got {data!r:.40}")
    hints = get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = _typed(hints[f.name], data[f.name], source)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise FlexMoEError(
                f"{str(source)!r} is not a flexmoe results file (no {f.name!r} in a {cls.__name__})"
            )
    return cls(**values)


def _typed(hint: Any, value: Any, source: Path | str) -> Any:
    """``value`` as the type ``hint`` names (a record, a list of them, a number, text, an
    optional one of these), or one error naming ``source`` when it is not one."""
    if hint is Any:
        return value
    options = [t for t in get_args(hint) if t is not type(None)] if _is_union(hint) else [hint]
    if value is None:
        if len(options) < len(get_args(hint)):  # None is allowed
            return None
        raise FlexMoEError(f"{str(source)!r} is damaged: a value is null where none may be")
    kind = options[0]
    if is_dataclass(kind):
        return from_plain(kind, value, source)
    origin = get_origin(kind) or kind
    if origin is list and isinstance(value, list):
        item = get_args(kind)[0] if get_args(kind) else Any
        return [_typed(item, v, source) for v in value]
    if origin is dict and isinstance(value, dict):
        item = get_args(kind)[1] if get_args(kind) else Any
        return {key: _typed(item, v, source) for key, v in value.items()}
    if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if origin is Any or (isinstance(value, origin) and not isinstance(value, bool)):
        return value
    raise FlexMoEError(
        f"{str(source)!r} is damaged: {value!r:.40} where {getattr(origin, '__name__', origin)} "
        "belongs"
    )


def _is_union(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) or get_origin(hint) is Union
