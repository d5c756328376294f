"""Saving and loading a client's personal state."""

import json

import pytest
import torch

from flexmoe.errors import FlexMoEError
from flexmoe.flex.config import FlexConfig
from flexmoe.flex.model import CONFIG_NAME, PERSONAL_WEIGHTS, SHARED_WEIGHTS, FlexModel
from flexmoe.flex.roles import Role
from flexmoe.models.loading import fingerprint
from tests.tiny_models import build_model, random_batches


def trained_flex(model_type: str = "qwen2_moe", **config) -> FlexModel:
    flex, _ = FlexModel.graft(build_model(model_type), random_batches(), FlexConfig(**config))
    optimizer = torch.optim.SGD([p for p in flex.parameters() if p.requires_grad], lr=0.1)
    for batch in random_batches(2, seed=9):
        flex(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return flex.eval()


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_reload_reproduces_the_personalised_model_exactly(tmp_path, model_type):
    flex = trained_flex(model_type, experts_per_layer=2, size_ratio=0.5)
    batch = random_batches(1, seed=4)[0]
    expected = flex(**batch).logits
    flex.save_pretrained(tmp_path, include_shared=True)
    loaded = FlexModel.from_pretrained(build_model(model_type), tmp_path).eval()
    assert torch.equal(loaded(**batch).logits, expected)
    assert loaded.grafts == flex.grafts


def test_personal_only_adapter_carries_no_shared_weights(tmp_path):
    flex = trained_flex()
    flex.save_pretrained(tmp_path)
    assert not (tmp_path / SHARED_WEIGHTS).exists()
    loaded = FlexModel.from_pretrained(build_model("qwen2_moe"), tmp_path)
    for name, value in flex.personal_state_dict().items():
        assert torch.equal(loaded.personal_state_dict()[name], value)
    assert all(
        torch.count_nonzero(v) == 0 for n, v in loaded.shared_state_dict().items() if "lora_B" in n
    )


def test_config_names_base_layers_sources_and_sizes(tmp_path):
    flex = trained_flex(experts_per_layer=2, size_ratio=0.25)
    flex.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["base_model"]["model_type"] == "qwen2_moe"
    assert [g["layer"] for g in saved["grafts"]] == [0, 1]
    assert all(g["intermediate_sizes"] == [4, 4] for g in saved["grafts"])
    assert all(len(g["source_experts"]) == 2 for g in saved["grafts"])
    assert not list(tmp_path.glob("*.tmp")), "temporary files must not be left behind"


def test_adapter_for_another_base_is_refused(tmp_path):
    trained_flex().save_pretrained(tmp_path)
    with pytest.raises(FlexMoEError, match="made for base model"):
        FlexModel.from_pretrained(build_model("qwen2_moe", seed=1), tmp_path)


def test_damaged_or_missing_adapter_is_refused(tmp_path):
    with pytest.raises(FlexMoEError, match="does not exist; give a folder written by"):
        FlexModel.from_pretrained(build_model("olmoe"), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(FlexMoEError, match=r"not valid JSON.*damaged"):
        FlexModel.from_pretrained(build_model("olmoe"), tmp_path)


def test_state_of_the_wrong_shape_is_refused():
    flex = trained_flex()
    personal = flex.personal_state_dict()
    personal.pop(next(iter(personal)))
    with pytest.raises(FlexMoEError, match="missing"):
        flex.load_state_of(Role.PERSONAL, personal)


def test_personal_file_holds_only_personal_tensors(tmp_path):
    from safetensors.torch import load_file

    flex = trained_flex()
    flex.save_pretrained(tmp_path)
    names = load_file(tmp_path / PERSONAL_WEIGHTS).keys()
    assert names and all("grafted_" in n for n in names)


def test_a_base_that_differs_only_in_expert_and_attention_weights_is_told_apart(tmp_path):
    base = build_model("qwen2_moe")
    flex, _ = FlexModel.graft(base, random_batches())
    flex.save_pretrained(tmp_path)
    other = build_model("qwen2_moe")  # the same weights, then experts and attention changed
    with torch.no_grad():
        for name, parameter in other.named_parameters():
            if "experts" in name or "self_attn" in name:
                parameter.mul_(1.5)
    with pytest.raises(FlexMoEError, match="made for base model"):
        FlexModel.from_pretrained(other, tmp_path)
    same = build_model("qwen2_moe")
    assert fingerprint(same) == fingerprint(same.to(torch.bfloat16)) == flex.base_fingerprint


def test_an_adapter_keeps_the_criterion_losses_it_was_grafted_with(tmp_path):
    flex, choices = FlexModel.graft(build_model("qwen2_moe"), random_batches(), FlexConfig())
    assert [g.losses for g in flex.grafts] == [tuple(c.losses) for c in choices]
    assert all(len(g.losses) == 6 for g in flex.grafts)
    flex.save_pretrained(tmp_path)
    assert FlexModel.from_pretrained(build_model("qwen2_moe"), tmp_path).grafts == flex.grafts
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    for layer in config["grafts"]:
        del layer["losses"]  # as an adapter saved before losses were kept
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    old = FlexModel.from_pretrained(build_model("qwen2_moe"), tmp_path)
    assert [g.losses for g in old.grafts] == [(), ()]
