"""The uniform MoE block view over every tested architecture."""

import pytest
import torch

from flexmoe.errors import FlexMoEError
from flexmoe.flex.moe import find_moe_blocks
from tests.tiny_models import ARCHITECTURES, build_model

ALL = sorted(ARCHITECTURES)


@pytest.mark.parametrize("model_type", ALL)
def test_every_sparse_block_is_found(model_type):
    model = build_model(model_type)
    views = find_moe_blocks(model)
    sparse = [n for n, m in model.named_modules() if hasattr(m, "gate_up_proj")]
    assert len(views) == len(sparse) >= 2
    assert all(v.num_experts >= 6 and v.rule.top_k == 2 for v in views)
    assert [v.layer for v in views] == sorted(v.layer for v in views)


@pytest.mark.parametrize("model_type", ALL)
def test_routing_rule_reproduces_the_router(model_type):
    view = find_moe_blocks(build_model(model_type))[-1]
    x = torch.randn(50, view.hidden_size, generator=torch.Generator().manual_seed(7))
    logits, weights, indices = view.router(x)
    dense = torch.zeros(logits.shape).scatter(-1, indices.long(), weights.float())
    assert torch.allclose(view.rule.dense(view.router_logits(x)), dense, atol=1e-6)


@pytest.mark.parametrize("model_type", ALL)
def test_expert_weights_compute_the_experts_module(model_type):
    view = find_moe_blocks(build_model(model_type))[0]
    x = torch.randn(5, view.hidden_size)
    for e in range(view.num_experts):
        gate, up, down = view.expert_weights(e)
        ours = (view.activation(x @ gate.T) * (x @ up.T)) @ down.T
        index = torch.full((5, 1), e)
        assert torch.allclose(ours, view.experts(x, index, torch.ones(5, 1)), atol=1e-6)


def test_rules_differ_by_architecture():
    rules = {t: find_moe_blocks(build_model(t))[0].rule for t in ALL}
    assert rules["deepseek_v3"].scoring == "sigmoid" and rules["deepseek_v3"].n_group == 2
    assert rules["deepseek_v3"].scale == 2.5
    assert rules["mixtral"].normalize and not rules["qwen2_moe"].normalize
    assert rules["qwen2_moe"].scoring == "softmax"


def test_shared_experts_are_exposed():
    assert find_moe_blocks(build_model("qwen2_moe"))[0].shared_expert_gate is not None
    assert find_moe_blocks(build_model("deepseek_v3"))[0].shared_expert is not None
    assert find_moe_blocks(build_model("olmoe"))[0].shared_expert is None


def test_dense_model_is_refused_with_its_type(dense_model_dir):
    from flexmoe.models.loading import load_model

    model, _ = load_model(dense_model_dir)
    with pytest.raises(FlexMoEError, match="'llama' has no sparse MoE block"):
        find_moe_blocks(model)


def test_unknown_expert_layout_is_refused():
    model = build_model("qwen3_moe")
    for layer in model.model.layers:  # experts that do not compute act(gate) * up -> down
        layer.mlp.experts.forward = lambda x, index, weights: torch.zeros_like(x)
    with pytest.raises(FlexMoEError, match="expert layout is unsupported"):
        find_moe_blocks(model)
