"""Settings of one federated run: defaults, a TOML file, command-line overrides, validation."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from flexmoe.data import SCHEMES
from flexmoe.errors import FlexMoEError
from flexmoe.methods import get_method

Scalar = str | int | float | bool


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's result; the default is the embedded `make run` job."""

    method: str = "flex"
    split: str = "pathological"
    alpha: float = 1.0
    clients: int = 4
    rounds: int = 10
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    seed: int = 0
    model: str = "tiny"
    data: str = "ni"
    fraction_train: float = 1.0
    experts_per_layer: int = 1
    size_ratio: float = 1.0
    gate_bias: float = 0.0
    max_new_tokens: int = 32
    max_length: int = 256
    max_train: int = 300
    max_test: int = 24
    test_fraction: float = 0.2
    max_per_task: int = 400
    proximal_mu: float = 0.01
    eval_every: int = 0  # also score ROUGE-L every this many rounds (0: only at the end)

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.split not in SCHEMES:
            raise FlexMoEError(f"unknown split {self.split!r}; choose one of {SCHEMES}")
        for name in ("clients", "rounds", "local_steps", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise FlexMoEError(f"{name.replace('_', '-')} must be at least 1")
        if not 0.0 < self.fraction_train <= 1.0:
            raise FlexMoEError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.alpha <= 0:
            raise FlexMoEError(f"alpha must be positive, got {self.alpha}")

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise FlexMoEError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise FlexMoEError(f"{str(path)!r} is not valid TOML: {error}") from None
        return cls().updated(data)

    def updated(self, values: dict[str, Any]) -> RunConfig:
        """A copy with ``values`` (keys with ``-`` or ``_``) applied; unknown keys are refused."""
        known = {f.name: f.type for f in fields(self)}
        changes = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise FlexMoEError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
            default = getattr(self, name)
            try:
                changes[name] = type(default)(value)
            except (TypeError, ValueError):
                raise FlexMoEError(f"setting {key!r} must be {type(default).__name__}") from None
        return replace(self, **changes)

    def to_flat(self) -> dict[str, Scalar]:
        """Kebab-case keys, as Flower run configs and ConfigRecords carry them."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}
