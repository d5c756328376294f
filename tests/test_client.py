"""The client's data preparation."""

from dataclasses import replace

import pytest

from flexmoe.client import fitting_examples
from flexmoe.data import InstructionExample, format_prompt
from flexmoe.errors import FlexMoEError


def test_only_whole_examples_that_fit_are_kept_and_the_answer_is_cached(
    tmp_path, monkeypatch, tokenizer
):
    monkeypatch.setenv("FLEXMOE_CACHE", str(tmp_path))
    examples = [InstructionExample("Say it.", "", "word " * n) for n in (1, 5, 40, 200)]
    lengths = [
        len(tokenizer.encode(format_prompt(e))) + len(tokenizer.encode(e.output)) for e in examples
    ]
    limit = sorted(lengths)[2]  # the two shortest fit, the others do not
    kept = fitting_examples(examples, tokenizer, limit)
    assert kept == [e for e, n in zip(examples, lengths, strict=True) if n < limit]
    assert len(kept) == 2
    assert len(list((tmp_path / "fitting").glob("*.json"))) == 1
    with pytest.raises(FlexMoEError, match="no example fits"):
        fitting_examples(examples[2:], tokenizer, 4)
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: pytest.fail("not cached"))
    assert fitting_examples(examples, tokenizer, limit) == kept


def test_the_fitting_cache_depends_on_the_prompt_template(tmp_path, monkeypatch, tokenizer):
    from flexmoe.client import datasets

    monkeypatch.setenv("FLEXMOE_CACHE", str(tmp_path))
    examples = [InstructionExample("Say it.", "", "word")]
    fitting_examples(examples, tokenizer, 200)
    monkeypatch.setattr(
        datasets, "format_prompt", lambda e, tokenizer=None: f"Q: {e.instruction}\nA: "
    )
    fitting_examples(examples, tokenizer, 200)
    assert len(list((tmp_path / "fitting").glob("*.json"))) == 2


def test_a_validation_run_never_evaluates_on_test_examples(tmp_path, monkeypatch, dolly_file):
    from flexmoe.client import client_datasets
    from flexmoe.runconfig import RunConfig

    monkeypatch.setenv("FLEXMOE_CACHE", str(tmp_path))
    config = RunConfig(data=str(dolly_file), max_length=512, max_test=3)
    tested = client_datasets(config)
    validated = client_datasets(replace(config, eval_split="validation"))
    for client, tuning in zip(tested, validated, strict=True):
        assert len(tuning.test) == len(client.test) > 0
        assert not set(client.test) & set(tuning.train + tuning.test)
        assert set(tuning.train + tuning.test) <= set(client.train)
