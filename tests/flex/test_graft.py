"""Grafting surgery and parameter roles."""

import pytest
import torch

from flexmoe.errors import FlexMoEError
from flexmoe.flex import FlexConfig, FlexModel
from flexmoe.flex.graft import GraftedMoEBlock, apply_grafts, grafted_blocks
from flexmoe.flex.moe import find_moe_blocks
from flexmoe.flex.roles import Role
from flexmoe.flex.sharing import SharedConfig
from tests.tiny_models import ARCHITECTURES, build_model, random_batches

ALL = sorted(ARCHITECTURES)


def grafted(model_type: str, **config) -> tuple[FlexModel, torch.nn.Module]:
    """A grafted model and an untouched copy of its base."""
    base, reference = build_model(model_type), build_model(model_type)
    flex, _ = FlexModel.graft(base, random_batches(), FlexConfig(**config))
    return flex, reference


def set_gate_bias(flex: FlexModel, value: float) -> None:
    with torch.no_grad():
        for block in grafted_blocks(flex):
            for gate in block.grafted_gates:
                gate.bias.fill_(value)


@pytest.mark.parametrize("model_type", ALL)
def test_closed_gates_give_the_base_model_exactly(model_type):
    flex, reference = grafted(model_type, experts_per_layer=2, size_ratio=0.5)
    batch = random_batches(1, seed=3)[0]
    set_gate_bias(flex, float("-inf"))
    assert torch.equal(flex(**batch).logits, reference(**batch).logits)
    set_gate_bias(flex, 0.0)
    assert not torch.allclose(flex(**batch).logits, reference(**batch).logits)


@pytest.mark.parametrize("model_type", ALL)
def test_grafted_expert_starts_as_a_copy_of_its_source(model_type):
    flex, _ = grafted(model_type)
    views = {v.layer: v for v in find_moe_blocks(flex.model)}
    x = torch.randn(7, views[flex.grafts[0].layer].hidden_size)
    for graft, block in zip(flex.grafts, grafted_blocks(flex), strict=True):
        view = views[graft.layer]
        expert = graft.source_experts[0]
        source = view.expert_outputs(view.expert_activations(x))[expert]
        assert torch.allclose(block.grafted_experts[0](x), source, atol=1e-6)
        gate = block.grafted_gates[0]
        assert torch.equal(gate.weight[0], view.router.weight[expert])
        assert torch.equal(gate.bias, torch.zeros(1))


def test_gate_bias_sets_how_open_the_gates_start():
    flex, _ = grafted("olmoe", gate_bias=-4.0)
    biases = [g.bias.item() for b in grafted_blocks(flex) for g in b.grafted_gates]
    assert biases == [-4.0] * len(biases)


@pytest.mark.parametrize("model_type", ALL)
def test_training_changes_only_shared_and_personal_parameters(model_type):
    flex, _ = grafted(model_type)
    flex.train()
    before = {n: p.detach().clone() for n, p in flex.model.named_parameters()}
    trainable = [p for p in flex.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for batch in random_batches(3, seed=5):
        loss = flex(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    roles = flex.roles()
    for name, parameter in flex.model.named_parameters():
        changed = not torch.equal(before[name], parameter)
        if roles[name] is Role.FROZEN:
            assert not changed, f"frozen {name} changed"
        elif "lora_A" not in name:  # LoRA A gets no gradient while B is still zero at step 1
            assert changed, f"{roles[name]} {name} did not train"


def test_roles_of_the_default_flex_model():
    flex, _ = grafted("qwen2_moe")
    roles = flex.roles()
    by_role = {r: [n for n, x in roles.items() if x is r] for r in Role}
    assert all(".lora_" in n and "self_attn" in n for n in by_role[Role.SHARED])
    assert {n.split(".")[-4] for n in by_role[Role.SHARED]} == {"q_proj", "k_proj", "v_proj"}
    assert all("grafted_" in n for n in by_role[Role.PERSONAL])
    frozen = by_role[Role.FROZEN]
    assert any("experts.gate_up_proj" in n for n in frozen)
    assert any(n.endswith("mlp.block.gate.weight") for n in frozen)
    assert not any("experts" in n or "gate.weight" in n for n in by_role[Role.SHARED])


@pytest.mark.parametrize(
    ("shared", "expect_shared", "expect_personal_extra"),
    [
        (SharedConfig(mode="full"), "self_attn.q_proj.weight", None),
        (SharedConfig(mode="all"), "experts.gate_up_proj", None),
        (SharedConfig(personal_lora_b=True), "lora_A", "lora_B"),
    ],
)
def test_other_shared_modes(shared, expect_shared, expect_personal_extra):
    flex = FlexModel(build_model("qwen2_moe"), config=FlexConfig(shared=shared))
    roles = flex.roles()
    assert any(expect_shared in n for n, r in roles.items() if r is Role.SHARED)
    if expect_personal_extra:
        personal = [n for n, r in roles.items() if r is Role.PERSONAL]
        assert personal and all(expect_personal_extra in n for n in personal)
    if shared.mode == "full":
        assert not any(".lora_" in n for n in roles)


def test_deepseek_default_targets_are_its_attention_projections():
    flex = FlexModel(build_model("deepseek_v3"))
    targets = set(flex.config.shared.target_modules)
    assert targets == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}


def test_unknown_lora_targets_are_refused():
    with pytest.raises(FlexMoEError, match="cannot put LoRA"):
        FlexModel(
            build_model("olmoe"),
            config=FlexConfig(shared=SharedConfig(target_modules=("no_such_proj",))),
        )
    with pytest.raises(FlexMoEError, match="unknown shared mode"):
        SharedConfig(mode="everything")


def test_grafting_twice_is_refused():
    flex, _ = grafted("olmoe")
    with pytest.raises(FlexMoEError, match="already grafted"):
        apply_grafts(flex.model, flex.grafts)
    assert all(isinstance(b, GraftedMoEBlock) for b in grafted_blocks(flex))
