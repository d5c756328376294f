"""Declared settings: one type checker, one range check, names by field or option."""

from dataclasses import dataclass

import pytest

from flexmoe.errors import FlexMoEError
from flexmoe.schema import Group, at_least, between, setting


@dataclass(frozen=True)
class Example(Group):
    steps: int = setting(5, "steps", at_least(1))
    ratio: float = setting(1.0, "a ratio", between(0, 1, True))
    source: str = setting("dolly", "where from", option="data")
    verbose: bool = setting(False, "say more")


def test_values_are_parsed_from_text_and_checked_when_the_group_is_made():
    made = Example.from_values({"steps": "3", "ratio": 1, "data": "x", "verbose": "yes"})
    assert made == Example(steps=3, ratio=1.0, source="x", verbose=True)
    assert isinstance(made.ratio, float)
    assert made.to_flat() == {"steps": 3, "ratio": 1.0, "data": "x", "verbose": True}


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
        ({"steps": True}, "steps must be a whole number, got True"),
        ({"ratio": "nan"}, "ratio must be a finite number"),
        ({"ratio": 0}, "ratio must be in (0, 1]"),
        ({"verbose": "perhaps"}, "verbose must be true or false"),
        ({"colour": 1}, "unknown setting 'colour'; known: ratio, source, steps, verbose"),
        ({"data": "x", "source": "y"}, "source is given twice"),
    ],
)
def test_a_bad_value_or_name_is_one_error_naming_the_setting(values, phrase):
    with pytest.raises(FlexMoEError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        Example.from_values(values)


def test_a_value_made_directly_is_checked_but_not_parsed():
    with pytest.raises(FlexMoEError, match="steps must be a whole number, got '3'"):
        Example(steps="3")
