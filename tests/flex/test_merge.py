"""Merging a personalised model into a plain Qwen2-MoE checkpoint: exact, or refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexmoe.errors import FlexMoEError
from flexmoe.flex import FlexConfig, FlexModel
from flexmoe.flex.graft import grafted_blocks
from flexmoe.flex.merge import merge_problem, merged_model
from tests.tiny_models import build_model, random_batches


def trained(model_type: str, **config) -> FlexModel:
    """A grafted model whose every trainable weight moved, as if trained (LoRA B included)."""
    flex, _ = FlexModel.graft(build_model(model_type), random_batches(), FlexConfig(**config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in flex.model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return flex.eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_a_mixtral_with_a_gate_without_bias_merges_exactly(tmp_path):
    flex = trained("mixtral", gate_with_bias=False)
    batch = random_batches(1, seed=5)[0]
    merged = merged_model(flex)
    assert merged.config.model_type == "qwen2_moe"
    merged.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    ours = logits(flex, batch)
    assert torch.allclose(logits(again, batch), ours, atol=1e-5)
    for block in grafted_blocks(flex.model):
        block.enabled = False  # the personal expert is in the merged model: without it, not equal
    assert not torch.allclose(logits(again, batch), logits(flex, batch), atol=1e-3)


@pytest.mark.parametrize(
    ("model_type", "config", "reason"),
    [
        ("mixtral", {}, "its gates have a bias and Qwen2-MoE's shared_expert_gate has none"),
        ("mixtral", {"experts_per_layer": 2, "gate_with_bias": False}, "more than one expert"),
        ("qwen2_moe", {"gate_with_bias": False}, "has a gated shared expert of its own"),
        ("qwen3_moe", {"gate_with_bias": False}, "in a way Qwen2-MoE does not"),
    ],
)
def test_what_cannot_merge_exactly_is_refused_with_its_reason(model_type, config, reason):
    flex = trained(model_type, **config)
    assert reason in merge_problem(flex)
    with pytest.raises(FlexMoEError, match="cannot merge exactly"):
        merged_model(flex)


def test_gates_without_bias_save_and_load_as_such(tmp_path):
    flex = trained("mixtral", gate_with_bias=False)
    flex.save_pretrained(tmp_path)
    again = FlexModel.from_pretrained(build_model("mixtral"), tmp_path)
    assert all(g.bias is None for b in grafted_blocks(again.model) for g in b.grafted_gates)
    with pytest.raises(FlexMoEError, match="gate-bias 1 needs a gate with a bias"):
        FlexConfig(gate_with_bias=False, gate_bias=1.0)
