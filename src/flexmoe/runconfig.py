"""Settings of one federated run: defaults, a TOML file, command-line overrides, validation.

Every setting carries a one-line description (for ``--help`` and the README) and its valid range,
checked when the settings are made, so a bad value fails in one line before any process starts.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError
from flexmoe.methods import METHODS, Method, get_method
from flexmoe.placement import DEVICE_FORMS, device_problem, dtype_problem
from flexmoe.results import CHECKPOINT_FILE, read_checkpoint

Scalar = str | int | float | bool
# the partition schemes of flexmoe.data (a test keeps them equal; data imports torch, this not)
SPLITS = ("pathological", "dirichlet", "iid")
# settings newer than some saved runs: a checkpoint without them ran with their defaults
ADDED_LATER = {
    "device",
    "dtype",
    "gradient-checkpointing",
    "lora-rank",
    "server-lr",
    "eval-split",
    "selection-tokens",
    "diagnostics",
    "mmlu-per-topic",
    "aggregation",
    "trim-fraction",
    "min-updates",
    "reply-timeout",
    "dp-noise-multiplier",
    "dp-clipping-norm",
    "dp-delta",
}
# settings of the fixed test pools: a checkpoint without them split its data another way
DATA_SPLIT_SETTINGS = ("categories", "test-per-category")
# how a run waits, not what it computes: two runs apart only here have the same results
RUNTIME_SETTINGS = ("reply-timeout",)
RESUMABLE_SETTINGS = ("rounds", *RUNTIME_SETTINGS)  # what a resumed run may change
AGGREGATIONS = ("mean", "median", "trimmed-mean")
EVAL_SPLITS = ("test", "validation")
# the tokens grafting may score (flexmoe.data.SELECTION_TOKENS; a test keeps them equal)
SELECTION_TOKENS = ("all", "content", "answer")
TRUTH = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
Check = Callable[[Any], str | None]  # a problem with a value, or None when it is valid


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


def above(low: float) -> Check:
    return lambda v: None if v > low else f"must be above {low}"


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Check:
    """``low <= v <= high``, either end open if asked."""

    def check(v: float) -> str | None:
        inside = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if inside:
            return None
        return f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    return check


def one_of(names: tuple[str, ...]) -> Check:
    return lambda v: None if v in names else f"must be one of: {', '.join(names)}"


def nonempty(text: str) -> str | None:
    return None if text.strip() else "must not be empty"


def setting(default: Scalar, help: str, check: Check | None = None) -> Any:
    """A RunConfig field: its default, a one-line description, and its valid range."""
    return field(default=default, metadata={"help": help, "check": check})


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's result; the default is the embedded `make run` job."""

    method: str = setting(
        "flex", f"FLEx, an ablation or a baseline: {', '.join(METHODS)}", one_of(tuple(METHODS))
    )
    split: str = setting(
        "pathological",
        "pathological (a category per client), dirichlet (alpha) or iid",
        one_of(SPLITS),
    )
    alpha: float = setting(1.0, "Dirichlet concentration over categories", above(0))
    clients: int = setting(4, "federation size", at_least(1))
    rounds: int = setting(10, "federated rounds", at_least(1))
    local_steps: int = setting(5, "local AdamW steps per round", at_least(1))
    batch_size: int = setting(4, "examples per step", at_least(1))
    lr: float = setting(1e-3, "learning rate, cosine-decayed across rounds", above(0))
    min_lr: float = setting(1e-5, "learning rate of the last round", at_least(0))
    seed: int = setting(0, "data split, initialisation, batches", at_least(0))
    model: str = setting("tiny", "a local Hugging Face MoE folder, or tiny or smol-moe", nonempty)
    data: str = setting(
        "dolly",
        "dolly (Dolly-15k, shipped), ni (Natural Instructions v1, from your bigbench 1.0.0 "
        "sdist) or an Alpaca/Dolly file",
        nonempty,
    )
    categories: str = setting(
        "default",
        "categories the clients' data comes from: default (the paper's closed_qa, "
        "information_extraction, classification and summarization when the data has them, "
        "else all), all, or a comma-separated list",
        nonempty,
    )
    fraction_train: float = setting(1.0, "share of clients sampled per round", between(0, 1, True))
    experts_per_layer: int = setting(1, "experts grafted per MoE layer (FLEx)", at_least(1))
    lora_rank: int = setting(32, "rank of the shared attention LoRA (alpha: 2 x rank)", at_least(1))
    size_ratio: float = setting(
        1.0, "share of a grafted expert's neurons kept", between(0, 1, True)
    )
    gate_bias: float = setting(0.0, "initial bias of the grafted experts' gates", between(-30, 30))
    max_new_tokens: int = setting(32, "greedy generation length for ROUGE-L", at_least(1))
    max_length: int = setting(
        512,
        "tokens per example: a longer input (context) is cut short, marked [...]; "
        "instruction and answer stay whole where they fit",
        at_least(2),
    )
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
    server_lr: float = setting(
        1e-3, "server learning rate of FedAdam, FedYogi and FedAdagrad (their eta)", above(0)
    )
    eval_split: str = setting(
        "test",
        "what evaluation scores: test, or validation (carved from each client's training "
        "share, for choosing hyperparameters)",
        one_of(EVAL_SPLITS),
    )
    selection_tokens: str = setting(
        "all",
        "tokens the grafting criterion scores: all, content (instruction, input and answer "
        "without the prompt template) or answer",
        one_of(SELECTION_TOKENS),
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
    device: str = setting(
        "auto", f"where clients hold the model: {DEVICE_FORMS} (auto: CUDA if any)", device_problem
    )
    dtype: str = setting(
        "auto",
        "the frozen base's precision: auto (bfloat16 on CUDA, float32 on CPU), float32, "
        "bfloat16 or float16; adapters train in float32",
        dtype_problem,
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass: less memory, slower steps"
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = _typed(spec.name, type(spec.default), getattr(self, spec.name))
            object.__setattr__(self, spec.name, value)
            problem = spec.metadata["check"] and spec.metadata["check"](value)
            if problem:
                raise FlexMoEError(f"{option_name(spec.name)} {problem}, got {value!r}")
        if self.min_lr > self.lr:
            raise FlexMoEError(f"min-lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.max_new_tokens >= self.max_length:
            raise FlexMoEError(
                f"max-new-tokens ({self.max_new_tokens}) must be below max-length "
                f"({self.max_length}): a test prompt and its answer share max-length tokens"
            )
        if self.dp_noise_multiplier > 0 and self.dp_clipping_norm == 0:
            raise FlexMoEError(
                "dp-noise-multiplier needs a dp-clipping-norm: noise is scaled to the clipping"
            )
        if self.dp_noise_multiplier > 0 and self.min_updates:
            raise FlexMoEError(
                "dp-noise-multiplier needs every sampled client's update (min-updates 0): the "
                "noise and the privacy accounting are calibrated to the clients sampled"
            )

    @property
    def private(self) -> bool:
        """Whether clients clip their updates (and the server adds noise) for DP."""
        return self.dp_clipping_norm > 0

    @property
    def prompt_room(self) -> int:
        """The tokens a test prompt may take, leaving ``max_new_tokens`` for its answer."""
        return self.max_length - self.max_new_tokens

    def chosen_method(self) -> Method:
        """The method this run names, with its settings (the LoRA rank) applied."""
        return get_method(self.method).with_lora_rank(self.lora_rank)

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise FlexMoEError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise FlexMoEError(f"{str(path)!r} is not valid TOML: {error}") from None
        return cls().updated(data)

    @classmethod
    def saved_in(cls, out: Path) -> RunConfig:
        """The settings of the run whose output folder is ``out`` (from its checkpoint)."""
        saved = read_checkpoint(out).config
        known = {option_name(k) for k in saved} | ADDED_LATER  # those take their defaults
        if not known & set(DATA_SPLIT_SETTINGS):
            raise FlexMoEError(
                f"{out} was made by a flexmoe before fixed test pools, whose clients' data this "
                "one does not rebuild; start a new run instead of resuming it"
            )
        try:
            missing = sorted(set(cls().to_flat()) - known)
            if missing:
                raise FlexMoEError(f"no {', '.join(missing[:3])}")
            return cls().updated(saved)
        except FlexMoEError as error:
            raise FlexMoEError(
                f"{out / CHECKPOINT_FILE}: the saved settings are damaged ({error})"
            ) from None

    def updated(self, values: dict[str, Any]) -> RunConfig:
        """A copy with ``values`` (keys with ``-`` or ``_``) applied; unknown keys are refused.

        Values keep their types (TOML, Flower's run config); a string for a number is parsed,
        as the command line gives them.
        """
        known = {f.name: type(f.default) for f in fields(self)}
        changes = {}
        for key, value in values.items():
            name = field_name(key)
            if name not in known:
                raise FlexMoEError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
            changes[name] = _parsed(name, known[name], value)
        return replace(self, **changes)

    def differences(self, other: RunConfig) -> dict[str, tuple[Scalar, Scalar]]:
        """``{setting: (mine, other's)}`` for every setting in which the two differ."""
        mine, theirs = asdict(self), asdict(other)
        return {option_name(k): (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}

    def to_flat(self) -> dict[str, Scalar]:
        """Kebab-case keys, as Flower run configs and ConfigRecords carry them."""
        return {option_name(k): v for k, v in asdict(self).items()}


def describe_settings() -> list[tuple[str, Scalar, str]]:
    """(option, default, description) of every setting, in declaration order."""
    return [(option_name(f.name), f.default, f.metadata["help"]) for f in fields(RunConfig)]


def settings_table() -> str:
    """The README's table of settings, made from the descriptions above."""
    rows = [f"| `{name}` | {default} | {text} |" for name, default, text in describe_settings()]
    return "\n".join(["| setting | default | meaning |", "| --- | --- | --- |", *rows])


def option_name(field: str) -> str:
    """A setting's name on the command line and in Flower's run config (``local-steps``)."""
    return field.replace("_", "-")


def field_name(option: str) -> str:
    """A setting's RunConfig field name (``local_steps``)."""
    return option.replace("-", "_")


def _parsed(name: str, kind: type, value: Any) -> Any:
    """A command-line string parsed as the setting's type; other values as they are."""
    if not isinstance(value, str) or kind is str:
        return value
    if kind is bool:
        if value.lower() not in TRUTH:
            raise FlexMoEError(f"{option_name(name)} must be true or false, got {value!r}")
        return TRUTH[value.lower()]
    try:
        return kind(value)
    except ValueError:
        raise FlexMoEError(
            f"{option_name(name)} must be {_kind_name(kind)}, got {value!r}"
        ) from None


def _typed(name: str, kind: type, value: Any) -> Any:
    """``value`` if it has the setting's type (an int is a float too); a finite one if a number."""
    valid = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, valid = float(value), True
    if not valid:
        raise FlexMoEError(f"{option_name(name)} must be {_kind_name(kind)}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise FlexMoEError(f"{option_name(name)} must be a finite number, got {value!r}")
    return value


def _kind_name(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false"}[kind]
