"""FlexConfig: the graft settings a run and `flexmoe graft` share, saved with every adapter."""

from dataclasses import asdict

import pytest

from flexmoe.errors import FlexMoEError
from flexmoe.flex.config import FlexConfig, GraftSettings
from flexmoe.flex.sharing import SharedConfig
from flexmoe.settings import Settings


def test_a_saved_config_comes_back_and_its_graft_settings_are_a_runs():
    config = FlexConfig(experts_per_layer=2, selection_tokens="answer", shared=SharedConfig())
    assert FlexConfig.from_dict(asdict(config)) == config
    graft = Settings.of(experts_per_layer=2, selection_tokens="answer").graft
    assert graft == GraftSettings(experts_per_layer=2, selection_tokens="answer")
    assert FlexConfig(**asdict(graft)).selection_tokens == "answer"


@pytest.mark.parametrize(
    ("saved", "phrase"),
    [
        ({"experts_per_layer": "2"}, "experts-per-layer must be a whole number, got '2'"),
        ({"size_ratio": 1.5}, "size-ratio must be in"),
        ({"selection": "best"}, "selection must be one of: top, greedy, exhaustive, random"),
        ({"selection_tokens": "most"}, "selection-tokens must be one of"),
    ],
)
def test_a_damaged_saved_config_is_refused_not_parsed(saved, phrase):
    with pytest.raises(FlexMoEError, match=phrase):
        FlexConfig.from_dict(saved)


def test_an_adapter_saved_before_selection_tokens_reads_with_their_default():
    old = {k: v for k, v in asdict(FlexConfig()).items() if k != "selection_tokens"}
    assert FlexConfig.from_dict(old).selection_tokens == "all"
