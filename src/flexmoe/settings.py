"""The settings of a federated run, in groups as PEFT's configs and torchtune's recipes group
theirs: what runs (method, model, data, seed, placement), then ``data``, ``graft``, ``train``,
``federation``, ``privacy`` and ``evaluation``.

Each setting is declared once (``flexmoe.schema.setting``): its default, description and range.
The command line names it ``--name``; a TOML file ``name = ...`` at the top or in its group's
table (``[train] lr = 0.01``); Flower's run config ``group.name`` (``train.lr``). A checkpoint,
``results.json`` and a run config of an earlier flexmoe hold the flat names, which are read too.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError
from flexmoe.flex.config import GraftSettings
from flexmoe.methods import METHODS, Aggregation, Method, get_method
from flexmoe.placement import DEVICE_FORMS, device_problem, dtype_problem
from flexmoe.schema import (
    Group,
    Scalar,
    above,
    at_least,
    between,
    kebab,
    nonempty,
    one_of,
    option_name,
    setting,
    snake,
    toml_literal,
)

# the partition schemes of flexmoe.data (a test keeps them equal; data imports torch, this not)
SPLITS = ("pathological", "dirichlet", "iid")
AGGREGATIONS = ("mean", "median", "trimmed-mean")
EVAL_SPLITS = ("test", "validation")
# Flower's run config also names the server's output folder, which is no setting
OUT_DIR = "out-dir"
FLOWER_OUT_DIR = "runs/flwr-run"  # its default, for `flwr run .`
# how a run waits, not what it computes: two runs apart only here have the same results
RUNTIME_SETTINGS = ("reply-timeout",)
RESUMABLE_SETTINGS = ("rounds", *RUNTIME_SETTINGS)  # what a resumed run may change
# settings newer than some saved runs, with what a run saved without one ran with: its default
# (None), or the value that was fixed before it became a setting
ADDED_LATER: dict[str, Scalar | None] = {
    **dict.fromkeys(
        ("device", "dtype", "gradient-checkpointing", "lora-rank", "server-lr", "eval-split",
         "selection-tokens", "diagnostics", "mmlu-per-topic", "aggregation", "trim-fraction",
         "min-updates", "reply-timeout", "dp-noise-multiplier", "dp-clipping-norm", "dp-delta",
         "micro-batch-size",  # a step's forward took the whole batch
         "eval-batch-size")  # test prompts were batched as training examples: scores as now
    ),
    "selection-examples": 0,  # grafting scored every training example
    "selection-token-budget": 0,  # and every token of them
    "gate-with-bias": True,  # the grafted gates had a bias
}  # fmt: skip


def as_saved(flat: dict[str, Scalar]) -> dict[str, Scalar]:
    """A saved run's flat settings with those it predates at the values it ran with (a setting
    whose value was its default is left to the default)."""
    known = {kebab(k) for k in flat}
    fixed = {k: v for k, v in ADDED_LATER.items() if v is not None and k not in known}
    return {**{snake(k): v for k, v in fixed.items()}, **flat}


@dataclass(frozen=True)
class DataSettings(Group):
    """Which examples each client trains and is tested on, and how long they may be."""

    source: str = setting(
        "dolly",
        "dolly (Dolly-15k, shipped), ni (Natural Instructions v1, from your bigbench 1.0.0 "
        "sdist) or an Alpaca/Dolly file",
        nonempty,
        option="data",
    )
    categories: str = setting(
        "default",
        "categories the clients' data comes from: default (the paper's closed_qa, "
        "information_extraction, classification and summarization when the data has them, "
        "else all), all, or a comma-separated list",
        nonempty,
    )
    split: str = setting(
        "pathological",
        "pathological (a category per client), dirichlet (alpha) or iid",
        one_of(SPLITS),
    )
    alpha: float = setting(1.0, "Dirichlet concentration over categories", above(0))
    max_train: int = setting(300, "training examples per client", at_least(1))
    max_test: int = setting(100, "test examples per client", at_least(1))
    test_per_category: int = setting(
        100,
        "test examples held out per category, the same for every seed and method",
        at_least(1),
    )
    test_fraction: float = setting(
        0.2, "most of a category's examples held out for testing", between(0, 1, True, True)
    )
    max_per_task: int = setting(400, "Natural Instructions examples per task", at_least(1))
    eval_split: str = setting(
        "test",
        "what evaluation scores: test, or validation (carved from each client's training "
        "share, for choosing hyperparameters)",
        one_of(EVAL_SPLITS),
    )
    max_length: int = setting(
        512,
        "tokens per example: a longer input (context) is cut short, marked [...]; "
        "instruction and answer stay whole where they fit",
        at_least(2),
    )


@dataclass(frozen=True)
class TrainSettings(Group):
    """A client's local training in every round."""

    local_steps: int = setting(5, "local AdamW steps per round", at_least(1))
    batch_size: int = setting(4, "examples per step", at_least(1))
    micro_batch_size: int = setting(
        0,
        "examples per forward pass (0: the whole batch); the parts' gradients add up to the "
        "batch's (the same in expectation: LoRA dropout draws differ). 1 pads nothing (fastest "
        "where compute is short, as on a CPU) and needs the least memory",
        at_least(0),
    )
    lr: float = setting(1e-3, "learning rate, cosine-decayed across rounds", above(0))
    min_lr: float = setting(1e-5, "learning rate of the last round", at_least(0))
    lora_rank: int = setting(32, "rank of the shared attention LoRA (alpha: 2 x rank)", at_least(1))
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass: less memory, slower steps"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_lr > self.lr:
            raise FlexMoEError(f"min-lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.micro_batch_size > self.batch_size:
            raise FlexMoEError(
                f"micro-batch-size ({self.micro_batch_size}) is more than batch-size "
                f"({self.batch_size}); give at most {self.batch_size} (0: the whole batch)"
            )

    @property
    def examples_per_forward(self) -> int:
        """The examples one forward pass of a training step holds."""
        return self.micro_batch_size or self.batch_size


@dataclass(frozen=True)
class FederationSettings(Group):
    """Who takes part, for how long, and how the server combines their updates."""

    clients: int = setting(4, "federation size", at_least(1))
    rounds: int = setting(10, "federated rounds", at_least(1))
    fraction_train: float = setting(1.0, "share of clients sampled per round", between(0, 1, True))
    proximal_mu: float = setting(0.01, "FedProx's mu (fedprox only)", at_least(0))
    aggregation: str = setting(
        "mean",
        "how FedAvg-aggregated methods combine updates: mean (weighted by examples), or the "
        "robust median or trimmed-mean (Flower's FedMedian, FedTrimmedAvg)",
        one_of(AGGREGATIONS),
    )
    trim_fraction: float = setting(
        0.25,
        "trimmed-mean: share of updates cut at each end, per value",
        between(0, 0.5, False, True),
    )
    min_updates: int = setting(
        0, "valid updates a round needs to aggregate (0: every sampled client's)", at_least(0)
    )
    reply_timeout: float = setting(
        0.0,
        "seconds the server waits for a round's replies, training or evaluation (0: as long "
        "as Flower's messages live, 12 h)",
        at_least(0),
    )
    server_lr: float = setting(
        1e-3, "server learning rate of FedAdam, FedYogi and FedAdagrad (their eta)", above(0)
    )


@dataclass(frozen=True)
class PrivacySettings(Group):
    """Client-level differential privacy of the shared parameters (off by default)."""

    dp_noise_multiplier: float = setting(
        0.0,
        "differential privacy: Gaussian noise added to the aggregate, as a multiple of the "
        "clipping norm over the clients averaged (0: none)",
        at_least(0),
    )
    dp_clipping_norm: float = setting(
        0.0,
        "differential privacy: L2 norm each client's update is clipped to (0: none)",
        at_least(0),
    )
    dp_delta: float = setting(
        1e-5, "differential privacy: the delta epsilon is reported at", between(0, 1, True, True)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dp_noise_multiplier > 0 and self.dp_clipping_norm == 0:
            raise FlexMoEError(
                "dp-noise-multiplier needs a dp-clipping-norm: noise is scaled to the clipping"
            )

    @property
    def enabled(self) -> bool:
        """Whether clients clip their updates (and the server adds noise)."""
        return self.dp_clipping_norm > 0


@dataclass(frozen=True)
class EvaluationSettings(Group):
    """What the clients' evaluation scores and measures."""

    max_new_tokens: int = setting(32, "greedy generation length for ROUGE-L", at_least(1))
    eval_batch_size: int = setting(
        32,
        "test prompts answered together (the test loss is scored in training batches)",
        at_least(1),
    )
    diagnostics: bool = setting(
        True, "measure knowledge, routing and FLOPs in the final evaluation"
    )
    mmlu_per_topic: int = setting(
        0, "MMLU questions per topic in the final evaluation's knowledge (0: none)", at_least(0)
    )
    eval_every: int = setting(
        0, "also score ROUGE-L every this many rounds (0: at the end only)", at_least(0)
    )


GROUPS: dict[str, type[Group]] = {
    "data": DataSettings,
    "graft": GraftSettings,
    "train": TrainSettings,
    "federation": FederationSettings,
    "privacy": PrivacySettings,
    "evaluation": EvaluationSettings,
}


@dataclass(frozen=True)
class Settings(Group):
    """Everything that decides a run's result; the default is the embedded `make run` job."""

    method: str = setting(
        "flex", f"FLEx, an ablation or a baseline: {', '.join(METHODS)}", one_of(tuple(METHODS))
    )
    model: str = setting("tiny", "a local Hugging Face MoE folder, or tiny or smol-moe", nonempty)
    seed: int = setting(0, "data split, initialisation, batches", at_least(0))
    device: str = setting(
        "auto", f"where clients hold the model: {DEVICE_FORMS} (auto: CUDA if any)", device_problem
    )
    dtype: str = setting(
        "auto",
        "the frozen base's precision: auto (bfloat16 on CUDA, float32 on CPU), float32, "
        "bfloat16 (mixed precision: float32 adapters compute in bfloat16) or float16",
        dtype_problem,
    )
    data: DataSettings = field(default_factory=DataSettings)
    graft: GraftSettings = field(default_factory=GraftSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.evaluation.max_new_tokens >= self.data.max_length:
            raise FlexMoEError(
                f"max-new-tokens ({self.evaluation.max_new_tokens}) must be below max-length "
                f"({self.data.max_length}): a test prompt and its answer share max-length tokens"
            )
        self._check_aggregation(self.chosen_method())

    def _check_aggregation(self, method: Method) -> None:
        """Refuse what the method's server cannot do: a robust aggregation in place of its own
        server optimiser, or differential privacy of anything but FedAvg's mean."""
        aggregation = self.federation.aggregation
        if (
            aggregation != "mean"
            and method.federated
            and method.aggregation is not Aggregation.FEDAVG
        ):
            raise FlexMoEError(
                f"aggregation={aggregation} replaces FedAvg's mean, and {method.name} "
                "aggregates with its own server optimiser; use aggregation=mean"
            )
        if not self.privacy.enabled:
            return
        if not method.federated:
            raise FlexMoEError(
                f"{method.name} federates nothing, so it has nothing to make private"
            )
        if aggregation != "mean" or not method.averages:
            raise FlexMoEError(
                f"differential privacy is accounted for FedAvg's mean; {method.name} with "
                f"aggregation={aggregation} aggregates otherwise"
            )
        if self.privacy.dp_noise_multiplier > 0 and self.federation.min_updates:
            raise FlexMoEError(
                "dp-noise-multiplier needs every sampled client's update (min-updates 0): the "
                "noise and the privacy accounting are calibrated to the clients sampled"
            )

    @property
    def prompt_room(self) -> int:
        """The tokens a test prompt may take, leaving ``max_new_tokens`` for its answer."""
        return self.data.max_length - self.evaluation.max_new_tokens

    def chosen_method(self) -> Method:
        """The method this run names, with its settings (the LoRA rank) applied."""
        return get_method(self.method).with_lora_rank(self.train.lora_rank)

    def groups(self) -> Iterator[tuple[str, Group]]:
        return ((name, getattr(self, name)) for name in GROUPS)

    @classmethod
    def of(cls, **flat: Any) -> Settings:
        """The defaults with settings given by flat name: ``Settings.of(method="fedavg")``."""
        return cls().updated(flat)

    @classmethod
    def from_toml(cls, path: str | Path) -> Settings:
        path = Path(path)
        if not path.is_file():
            raise FlexMoEError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise FlexMoEError(f"{str(path)!r} is not valid TOML: {error}") from None
        return cls().updated(data)

    def updated(self, values: dict[str, Any], where: str = "") -> Settings:
        """A copy with ``values`` applied; unknown names are refused.

        A key is a setting's flat name (``lr``, ``selection-tokens``; ``-`` or ``_``), a dotted
        one (``train.lr``, as Flower's run config has them), or a group's name with a table of
        its own (``{"train": {"lr": 0.01}}``, as TOML has them). Values keep their types; a
        string for a number is parsed, as the command line gives them.
        """
        mine: dict[str, Any] = {}
        grouped: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        for key, value in values.items():
            group, _, name = key.rpartition(".")
            if not group and key in GROUPS and isinstance(value, dict):
                _add(grouped[key], value, key)
            elif group:
                _check_group(group, name, key)
                _add(grouped[group], {name: value}, group)
            elif (owner := FLAT_OWNERS.get(snake(key))) is not None:
                _add(grouped[owner], {key: value}, owner)
            elif snake(key) in {spec.name for spec in self.specs()}:
                mine[key] = value
            else:
                names = ", ".join(sorted(self.to_flat()))
                raise FlexMoEError(f"unknown setting {where + key!r}; known: {names}")
        changes = {
            name: replace(getattr(self, name), **GROUPS[name].changes(group_values, f"{name}."))
            for name, group_values in grouped.items()
            if group_values
        }
        # one replace, so that settings checked together are checked at their new values
        return replace(self, **self.changes(mine, where), **changes)

    def to_flat(self) -> dict[str, Scalar]:
        """Every setting by its flat name: what checkpoints and results files record."""
        flat = super().to_flat()
        for _, group in self.groups():
            flat.update(group.to_flat())
        return flat

    def to_record(self) -> dict[str, Scalar]:
        """The flat settings as checkpoints and results files hold them (``local_steps``)."""
        return {snake(name): value for name, value in self.to_flat().items()}

    def to_run_config(self) -> dict[str, Scalar]:
        """Every setting by its Flower run config name: ``group.name``, or ``name`` at the top."""
        flat = self.to_flat()
        return {d.key: flat[d.option] for d in describe_settings()}

    def differences(self, other: Settings) -> dict[str, tuple[Scalar, Scalar]]:
        """``{setting: (mine, other's)}`` for every setting in which the two differ."""
        mine, theirs = self.to_flat(), other.to_flat()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def _add(group: dict[str, Any], values: dict[str, Any], name: str) -> None:
    """Gather ``values`` for group ``name``; a setting given twice (flat and dotted, say) is
    refused here, or by the group when given by its two names."""
    for key, value in values.items():
        if snake(key) in map(snake, group):
            raise FlexMoEError(f"{name}.{kebab(key)} is given twice")
        group[key] = value


def _check_group(group: str, name: str, key: str) -> None:
    """Refuse an unknown group, and name the group of a setting put in another one."""
    if group not in GROUPS:
        raise FlexMoEError(
            f"unknown setting group {group!r} in {key!r}; known: {', '.join(GROUPS)}"
        )
    owner = FLAT_OWNERS.get(snake(name))
    if owner is not None and owner != group:
        raise FlexMoEError(f"{name} is a setting of [{owner}], not of [{group}] ({key!r})")


# the group of every grouped setting's flat names (field and option), read for flat records
FLAT_OWNERS: dict[str, str] = {
    snake(name): group_name
    for group_name, group in GROUPS.items()
    for spec in group.specs()
    for name in {spec.name, option_name(spec)}
}


@dataclass(frozen=True)
class Described:
    """One setting as the command line, the docs and Flower's run config show it."""

    option: str  # the flat name: --option, and in checkpoints and results
    key: str  # its name in Flower's run config and in TOML (``train.lr``)
    default: Scalar
    help: str


def describe_settings() -> list[Described]:
    """Every setting, the top-level ones first, then group by group."""
    described = [
        Described(option_name(s), option_name(s), s.default, s.metadata["help"])
        for s in Settings.specs()
    ]
    for group_name, group in GROUPS.items():
        described += [
            Described(
                option_name(s), f"{group_name}.{kebab(s.name)}", s.default, s.metadata["help"]
            )
            for s in group.specs()
        ]
    return described


def settings_table() -> str:
    """The docs' table of settings, made from the declarations above."""
    rows = [f"| `--{d.option}` | `{d.key}` | {d.default} | {d.help} |" for d in describe_settings()]
    return "\n".join(
        ["| option | TOML / run config | default | meaning |", "| --- | --- | --- | --- |", *rows]
    )


def flower_app_config() -> str:
    """The ``[tool.flwr.app.config]`` table of pyproject.toml, made from the declarations."""
    lines = ["[tool.flwr.app.config]", f"{OUT_DIR} = {toml_literal(FLOWER_OUT_DIR)}"]
    lines += [f"{d.key} = {toml_literal(d.default)}" for d in describe_settings()]
    return "\n".join(lines)
