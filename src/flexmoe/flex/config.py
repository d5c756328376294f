"""How a client grafts: ``GraftSettings`` (a run's ``graft`` group and ``flexmoe graft``'s
options) and ``FlexConfig``, those with what the method decides (selection, seed, sharing).

Plain data without torch: the settings and the command line read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self

from flexmoe.errors import FlexMoEError
from flexmoe.flex.sharing import SharedConfig
from flexmoe.schema import Group, at_least, between, one_of, setting

SELECTION_STRATEGIES = ("top", "greedy", "exhaustive", "random")
# the tokens the criterion may score (flexmoe.data.SELECTION_TOKENS; a test keeps them equal)
SELECTION_TOKENS = ("all", "content", "answer")


@dataclass(frozen=True)
class GraftSettings(Group):
    """Which experts a client grafts, and how they start."""

    experts_per_layer: int = setting(1, "experts grafted per MoE layer (FLEx)", at_least(1))
    size_ratio: float = setting(
        1.0, "share of a grafted expert's neurons kept", between(0, 1, True)
    )
    gate_bias: float = setting(0.0, "initial bias of the grafted experts' gates", between(-30, 30))
    gate_with_bias: bool = setting(
        True,
        "the grafted gates train a bias; without one (gate-bias 0) a personal expert merges "
        "exactly into a Qwen2-MoE gated shared expert (flexmoe export --merge)",
    )
    selection_tokens: str = setting(
        "all",
        "tokens the grafting criterion scores: all, content (instruction, input and answer "
        "without the prompt template) or answer",
        one_of(SELECTION_TOKENS),
    )
    selection_examples: int = setting(
        64,
        "examples the grafting criterion scores: the first of a client's shuffled training "
        "share (of the data, for flexmoe graft), 0 for all; the cost of grafting grows with them",
        at_least(0),
    )

    selection_token_budget: int = setting(
        4096,
        "tokens per MoE layer the grafting criterion scores: a uniform draw (by the run's seed) "
        "from the selection examples' scored tokens, 0 for all; bounds grafting's cost at any "
        "number of experts",
        at_least(0),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gate_with_bias and self.gate_bias != 0:
            raise FlexMoEError(
                f"gate-bias {self.gate_bias:g} needs a gate with a bias; drop it or keep the "
                "gates' bias (gate-with-bias)"
            )

    @property
    def selection_count(self) -> int | None:
        """How many examples selection scores, None for all (a slice's end)."""
        return self.selection_examples or None


@dataclass(frozen=True)
class FlexConfig(GraftSettings):
    """How a client personalises: what it grafts (``GraftSettings``), how it selects, and what
    it shares. Saved with every adapter."""

    selection: str = setting(
        "top",
        "top (the paper's: the lowest single-expert losses), greedy, exhaustive or random",
        one_of(SELECTION_STRATEGIES),
    )
    seed: int = setting(0, "of a random selection and of the scored tokens' draw", at_least(0))
    shared: SharedConfig = field(default_factory=SharedConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """A config as ``asdict`` wrote it (an adapter's): its values as they were saved (a
        number saved as text is damage, not parsed), checked as the config is made."""
        values = dict(data)
        shared = values.pop("shared", {})
        return cls(**values, shared=SharedConfig(**shared))
