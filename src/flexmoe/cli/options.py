"""Small argument types shared by the commands."""

from __future__ import annotations

import argparse

MODEL_HELP = "a local Hugging Face MoE folder, or a named model: tiny, smol-moe"


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, for every command that loads a model."""
    from flexmoe.placement import DEVICE_FORMS, DTYPE_NAMES

    parser.add_argument(
        "--device", default="auto", help=f"{DEVICE_FORMS} (default auto: CUDA if present)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_NAMES,
        help="of the frozen base (default auto: bfloat16 on CUDA, float32 on CPU)",
    )


def placement_of(args: argparse.Namespace):
    """The ``Placement`` that ``--device`` and ``--dtype`` name, checked on this machine."""
    return checked_placement(args.device, args.dtype)


def checked_placement(device: str, dtype: str):
    """The placement named, resolved here, with a warning on stderr where it is slow."""
    import sys

    from flexmoe.hardware import Placement

    placement = Placement.resolve(device, dtype)
    if slow := placement.slow:
        print(f"flexmoe: warning: {slow}", file=sys.stderr)
    return placement


def names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def integers(text: str) -> list[int]:
    try:
        return [int(part) for part in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None
