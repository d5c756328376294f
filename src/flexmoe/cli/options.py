"""Small argument types shared by the commands."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from flexmoe.schema import Group, option_name

if TYPE_CHECKING:  # torch loads with the command that needs it, not with the parser
    from flexmoe.hardware import Placement

G = TypeVar("G", bound=Group)

MODEL_HELP = "a local Hugging Face MoE folder, or a named model: tiny, smol-moe"


METAVARS = {int: "N", float: "X", str: "TEXT", bool: "BOOL"}


def add_setting_options(
    parser: argparse.ArgumentParser,
    group: type[Group],
    names: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    unset: bool = False,
) -> None:
    """``--option`` for each setting of ``group`` (or those ``names`` names), with the help
    declared for it and its default, or the command's own in ``defaults``. With ``unset`` an
    option not given is None, for settings that come from elsewhere too (a TOML file, a saved
    run). Values stay text: the group checks them when it is made (``chosen_settings``)."""
    for spec in group.specs():
        if names is not None and spec.name not in names:
            continue
        default = (defaults or {}).get(spec.name, spec.default)
        parser.add_argument(
            f"--{option_name(spec)}",
            dest=spec.name,
            default=None if unset else default,
            metavar=METAVARS[type(spec.default)],
            help=f"{spec.metadata['help']} (default {default})",
        )


def setting_values(args: argparse.Namespace, group: type[Group]) -> dict[str, Any]:
    """The values of ``group``'s settings that the command has options for, by field name."""
    return {
        spec.name: getattr(args, spec.name) for spec in group.specs() if hasattr(args, spec.name)
    }


def chosen_settings(args: argparse.Namespace, group: type[G]) -> G:
    """``group`` with the values of the command's options for it, checked."""
    return group.from_values(setting_values(args, group))


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


def placement_of(args: argparse.Namespace) -> Placement:
    """The ``Placement`` that ``--device`` and ``--dtype`` name, checked on this machine."""
    return checked_placement(args.device, args.dtype)


def checked_placement(device: str, dtype: str) -> Placement:
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
