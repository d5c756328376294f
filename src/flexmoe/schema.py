"""Declared, self-checking settings: a field's default, its one-line description and its valid
range in one place, read by every command line, TOML file and record that sets it.

A ``Group`` is a frozen dataclass of such fields whose values are checked (type, finiteness,
range) when it is made, so a bad value fails in one line naming the setting, before any work.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Self

from flexmoe.errors import FlexMoEError

Scalar = str | int | float | bool
Check = Callable[[Any], str | None]  # a problem with a value, or None when it is valid
TRUTH = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


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


def setting(default: Scalar, help: str, check: Check | None = None, option: str = "") -> Any:
    """A settings field: its default, a one-line description, its valid range, and the name it
    has on the command line when that is not the field's own (``--data`` for ``source``)."""
    return field(default=default, metadata={"help": help, "check": check, "option": option})


def option_name(spec: Field) -> str:
    """A setting's name on the command line and in flat records (``local-steps``)."""
    return spec.metadata.get("option") or kebab(spec.name)


def toml_literal(value: Scalar) -> str:
    """A value as a TOML literal (JSON strings and numbers are TOML's too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def kebab(name: str) -> str:
    return name.replace("_", "-")


def snake(name: str) -> str:
    return name.replace("-", "_")


@dataclass(frozen=True)
class Group:
    """A group of settings, each a declared scalar, checked when the group is made."""

    def __post_init__(self) -> None:
        for spec in self.specs():
            value = typed(option_name(spec), type(spec.default), getattr(self, spec.name))
            object.__setattr__(self, spec.name, value)
            problem = spec.metadata["check"] and spec.metadata["check"](value)
            if problem:
                raise FlexMoEError(f"{option_name(spec)} {problem}, got {value!r}")

    @classmethod
    def specs(cls) -> Iterator[Field]:
        """The declared settings of this group, in declaration order."""
        return (spec for spec in fields(cls) if "help" in spec.metadata)

    @classmethod
    def from_values(cls, values: dict[str, Any], where: str = "") -> Self:
        """The group with ``values`` (by field or option name, ``-`` or ``_``) over its
        defaults; an unknown name is refused, a string for a number parsed."""
        return cls().updated(values, where)

    def updated(self, values: dict[str, Any], where: str = "") -> Self:
        """A copy with ``values`` applied (see ``from_values``)."""
        return replace(self, **self.changes(values, where))

    @classmethod
    def changes(cls, values: dict[str, Any], where: str = "") -> dict[str, Any]:
        """``{field: value}`` of ``values`` (by field or option name), parsed; a name that is
        not this group's, or one setting given twice, is one error."""
        specs = list(cls.specs())
        known = {snake(option_name(s)): s for s in specs} | {s.name: s for s in specs}
        changes = {}
        for key, value in values.items():
            spec = known.get(snake(key))
            if spec is None:
                names = ", ".join(sorted(kebab(s.name) for s in specs))
                raise FlexMoEError(f"unknown setting {where + key!r}; known: {names}")
            if spec.name in changes:
                raise FlexMoEError(f"{where + kebab(spec.name)} is given twice")
            changes[spec.name] = parsed(option_name(spec), type(spec.default), value)
        return changes

    def to_flat(self) -> dict[str, Scalar]:
        """``{option name: value}`` of every setting, in declaration order."""
        return {option_name(spec): getattr(self, spec.name) for spec in self.specs()}


def parsed(name: str, kind: type, value: Any) -> Any:
    """A command-line string parsed as the setting's type; other values as they are."""
    if not isinstance(value, str) or kind is str:
        return value
    if kind is bool:
        if value.lower() not in TRUTH:
            raise FlexMoEError(f"{name} must be true or false, got {value!r}")
        return TRUTH[value.lower()]
    try:
        return kind(value)
    except ValueError:
        raise FlexMoEError(f"{name} must be {kind_name(kind)}, got {value!r}") from None


def typed(name: str, kind: type, value: Any) -> Any:
    """``value`` if it has the setting's type (an int is a float too); a finite one if a number."""
    valid = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, valid = float(value), True
    if not valid:
        raise FlexMoEError(f"{name} must be {kind_name(kind)}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise FlexMoEError(f"{name} must be a finite number, got {value!r}")
    return value


def kind_name(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false"}[kind]
