"""What a federation shares: the configuration of the shared (federated) parameters.

Plain data, without torch, so that the methods table and the command line can name it cheaply;
``flexmoe.flex.roles`` applies it to a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexmoe.errors import FlexMoEError

SHARED_MODES = ("lora", "full", "all")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class SharedConfig:
    """What the federation trains and averages."""

    mode: str = "lora"
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    personal_lora_b: bool = False

    @property
    def trains_base_weights(self) -> bool:
        """Whether training changes pretrained weights (modes ``full`` and ``all``)."""
        return self.mode != "lora"

    def __post_init__(self) -> None:
        if self.mode not in SHARED_MODES:
            raise FlexMoEError(f"unknown shared mode {self.mode!r}; choose one of {SHARED_MODES}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
