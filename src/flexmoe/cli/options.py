"""Small argument types shared by the commands."""

from __future__ import annotations

import argparse

MODEL_HELP = "a local Hugging Face MoE folder, or a named model: tiny, smol-moe"


def names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def integers(text: str) -> list[int]:
    try:
        return [int(part) for part in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None
