"""The cost of K+1 experts: analytic FLOPs against hand counts, and the latency report's shape."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flexmoe.data import text_batches
from flexmoe.errors import FlexMoEError
from flexmoe.evaluation.cost import flops_per_token, grafting_flops, latency_ratio
from flexmoe.flex.graft import LayerGraft, grafted_blocks
from flexmoe.flex.model import FlexModel
from flexmoe.flex.moe import find_moe_blocks
from flexmoe.flex.selection import select_experts
from tests.tiny_models import ARCHITECTURES, build_model, random_batches

H = 32  # conftest's hidden size; routed experts have I = 16 and top-2 routing everywhere
ROUTED = 2 * 3 * 2 * H * 16


@pytest.mark.parametrize(
    ("model_type", "router", "shared", "layers"),
    [
        ("qwen2_moe", 2 * H * 6, 3 * 2 * H * 32 + 2 * H, [0, 1]),  # gated shared expert, I = 32
        ("mixtral", 2 * H * 6, 0, [0, 1]),
        ("deepseek_v3", 2 * H * 8, 3 * 2 * H * 16, [1, 2]),  # one shared expert; layer 0 is dense
    ],
)
def test_base_flops_are_router_routed_and_shared(model_type, router, shared, layers):
    flops = flops_per_token(build_model(model_type))
    per_layer = router + ROUTED + shared
    assert [layer["layer"] for layer in flops["layers"]] == layers
    assert [(lay["router"], lay["routed"], lay["shared"]) for lay in flops["layers"]] == [
        (router, ROUTED, shared)
    ] * 2
    assert flops["base"] == flops["personalised"] == 2 * per_layer
    assert flops["ratio"] == 1.0
    assert {layer["experts_per_token"] for layer in flops["layers"]} == {2}


def test_grafted_flops_add_each_expert_and_gate():
    graft = LayerGraft(0, (1, 4), (tuple(range(16)), tuple(range(0, 16, 2))))
    flops = flops_per_token(FlexModel(build_model("qwen2_moe"), [graft]).model)
    grafted = 3 * 2 * H * 16 + 3 * 2 * H * 8 + 2 * (2 * H)
    assert [layer["grafted"] for layer in flops["layers"]] == [grafted, 0]
    assert [layer["experts_per_token"] for layer in flops["layers"]] == [4, 2]
    base = 2 * (2 * H * 6 + ROUTED + 3 * 2 * H * 32 + 2 * H)
    assert (flops["base"], flops["personalised"]) == (base, base + grafted)
    assert flops["ratio"] == pytest.approx((base + grafted) / base)
    assert flops["ratio"] == pytest.approx(30208 / 25472)


def test_latency_ratio_times_one_model_as_itself_and_as_its_base():
    personalised = FlexModel.graft(build_model("olmoe"), random_batches())[0]
    result = latency_ratio(personalised, random_batches(2), repeats=3)
    assert set(result) == {"personalised_s", "base_s", "ratio", "repeats", "tokens"}
    assert result["personalised_s"] > 0 and result["base_s"] > 0
    assert result["ratio"] == result["personalised_s"] / result["base_s"]
    assert (result["repeats"], result["tokens"]) == (3, 40)
    with pytest.raises(FlexMoEError, match="at least one batch and one repeat"):
        latency_ratio(personalised, random_batches(1), repeats=0)
    assert all(block.enabled for block in grafted_blocks(personalised.model))  # on again


def test_text_batches_cut_the_joined_texts_into_full_windows(tokenizer):
    texts = ["The quick brown fox.", "def add(a, b): return a + b"] * 5
    ids = [i for t in texts for i in tokenizer.encode(t, add_special_tokens=False)]
    batches = text_batches(tokenizer, texts, seq_len=4, batch_size=2, count=3)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 4)] * 3
    assert [i for b in batches for i in b["input_ids"].flatten().tolist()] == ids[:24]
    assert all(bool(b["attention_mask"].all()) for b in batches)
    with pytest.raises(
        FlexMoEError, match=r"fill 0 batches of 8 x 64 tokens, not 4; give more text"
    ):
        text_batches(tokenizer, texts, seq_len=64, batch_size=8, count=4)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_grafting_flops_are_what_torch_counts(model_type):
    model = build_model(model_type)
    model.set_experts_implementation("eager")  # grouped_mm is invisible to the flop counter
    tokens = 12  # sequences of one token: attention scores, left out of the count, are tiny
    batch = {
        "input_ids": torch.randint(2, 50, (tokens, 1)),
        "attention_mask": torch.ones(tokens, 1, dtype=torch.long),
    }
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(**batch, use_cache=False, logits_to_keep=1)
    views = find_moe_blocks(model)  # outside the count: it checks each block's layout
    with FlopCounterMode(display=False) as grafting:
        select_experts(model, views, [batch])
    head = 2 * model.get_output_embeddings().weight.numel() * tokens
    counted = grafting_flops(model)
    assert forward.get_total_flops() - head == pytest.approx(counted["forward"] * tokens, rel=0.02)
    scoring = grafting.get_total_flops() - forward.get_total_flops()
    assert scoring == counted["scoring"] * tokens
