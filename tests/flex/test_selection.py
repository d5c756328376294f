"""Expert selection: the fast path against brute force through each block's real forward."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from flexmoe.errors import FlexMoEError
from flexmoe.flex import selection
from flexmoe.flex.graft import plan_grafts
from flexmoe.flex.moe import MoEBlockView, find_moe_blocks
from flexmoe.flex.selection import scored_token_masks, select_experts
from tests.tiny_models import ARCHITECTURES, build_model, random_batches


class RouteOnly(TorchFunctionMode):
    """Sets the router logits of every expert outside ``allowed`` to -inf, inside real code."""

    def __init__(self, router_weight: torch.Tensor, allowed: torch.Tensor, fill=float("-inf")):
        super().__init__()
        self.router_weight, self.allowed, self.fill = router_weight, allowed, fill

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and self._is_router(args[1]):
            out = out.masked_fill(~self.allowed, self.fill)
        return out

    def _is_router(self, weight: torch.Tensor) -> bool:
        same_shape = weight.shape == self.router_weight.shape
        return same_shape and torch.equal(weight.float(), self.router_weight.float())


def block_inputs(model, view: MoEBlockView, batches) -> list[torch.Tensor]:
    inputs = []
    handle = view.block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    return inputs


@torch.no_grad()
def brute_force_loss(model, view, batches, experts) -> float:
    """sum over batches of ||Z - Z_S||_F, running the real block with routing limited to S."""
    allowed = torch.zeros(view.num_experts, dtype=torch.bool)
    allowed[list(experts)] = True
    total = 0.0
    for x, batch in zip(block_inputs(model, view, batches), batches, strict=True):
        with RouteOnly(view.router.weight, allowed):
            limited = view.block(x)
        keep = batch.get("scored_mask", batch["attention_mask"]).bool()
        total += (view.block(x) - limited)[keep].norm().item()
    return total


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_fast_losses_equal_brute_force(model_type):
    model, batches = build_model(model_type), random_batches()
    views = find_moe_blocks(model)
    choices = select_experts(model, views, batches)
    for view, choice in zip(views, choices, strict=True):
        brute = [brute_force_loss(model, view, batches, [e]) for e in range(view.num_experts)]
        assert choice.losses == pytest.approx(brute, rel=1e-4, abs=1e-6)
        assert choice.chosen == [min(range(view.num_experts), key=brute.__getitem__)]
        assert len(set(brute)) == len(brute), "losses must tell experts apart"


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_selection_scores_only_the_marked_tokens(model_type):
    model, batches = build_model(model_type), random_batches()
    generator = torch.Generator().manual_seed(1)
    for batch in batches:  # a random half of the real tokens is scored; all still attend
        half = torch.rand(batch["attention_mask"].shape, generator=generator) < 0.5
        batch["scored_mask"] = batch["attention_mask"] * half
    views = find_moe_blocks(model)
    marked = select_experts(model, views, batches)
    for view, choice in zip(views, marked, strict=True):
        brute = [brute_force_loss(model, view, batches, [e]) for e in range(view.num_experts)]
        assert choice.losses == pytest.approx(brute, rel=1e-4, abs=1e-6)
    unmarked = [{k: v for k, v in b.items() if k != "scored_mask"} for b in batches]
    everywhere = select_experts(model, views, unmarked)
    assert [c.losses for c in marked] != [c.losses for c in everywhere]


def test_a_token_budget_draws_that_many_scored_tokens_by_seed():
    batches = random_batches()  # 60 real tokens
    masks = scored_token_masks(batches, 25, seed=3)
    assert sum(int(m.sum()) for m in masks) == 25
    real = [b["attention_mask"].bool() for b in batches]
    assert all(not (m & ~r).any() for m, r in zip(masks, real, strict=True))
    same, other = scored_token_masks(batches, 25, 3), scored_token_masks(batches, 25, 4)
    assert all(torch.equal(m, n) for m, n in zip(masks, same, strict=True))
    assert not all(torch.equal(m, n) for m, n in zip(masks, other, strict=True))
    for budget in (0, 60, 1000):  # none, or no fewer than there are: every token
        whole = scored_token_masks(batches, budget, seed=3)
        assert all(torch.equal(m, r) for m, r in zip(whole, real, strict=True))


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_a_token_budget_scores_exactly_the_drawn_tokens(model_type):
    model, batches = build_model(model_type), random_batches()
    views = find_moe_blocks(model)
    budgeted = select_experts(model, views, batches, seed=3, token_budget=25)
    drawn = scored_token_masks(batches, 25, seed=3)
    marked = [{**b, "scored_mask": m.long()} for b, m in zip(batches, drawn, strict=True)]
    for view, choice in zip(views, budgeted, strict=True):
        brute = [brute_force_loss(model, view, marked, [e]) for e in range(view.num_experts)]
        assert choice.losses == pytest.approx(brute, rel=1e-4, abs=1e-6)
    assert [c.losses for c in budgeted] != [c.losses for c in select_experts(model, views, batches)]


@pytest.mark.parametrize("strategy", ["top", "greedy"])
def test_scoring_token_by_token_changes_nothing(monkeypatch, strategy):
    model, batches = build_model("olmoe"), random_batches()
    views = find_moe_blocks(model)
    whole = select_experts(model, views, batches, 2, strategy)
    monkeypatch.setattr(selection, "MAX_MIXED_ELEMENTS", 1)  # one token and one set at a time
    chunked = select_experts(model, views, batches, 2, strategy)
    for a, b in zip(whole, chunked, strict=True):
        assert (a.chosen, a.losses) == (b.chosen, pytest.approx(b.losses, rel=1e-5))
        assert torch.allclose(a.importance, b.importance, atol=1e-6)


def test_top_r_takes_the_lowest_losses():
    model, batches = build_model("olmoe"), random_batches()
    for choice in select_experts(model, find_moe_blocks(model), batches, experts_per_layer=3):
        assert choice.chosen == sorted(range(6), key=choice.losses.__getitem__)[:3]


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_exhaustive_finds_the_best_set_by_brute_force(model_type):
    model, batches = build_model(model_type), random_batches(2)
    views = find_moe_blocks(model)
    choices = select_experts(model, views, batches, 2, strategy="exhaustive")
    view, choice = views[0], choices[0]
    brute = {
        s: brute_force_loss(model, view, batches, s)
        for s in itertools.combinations(range(view.num_experts), 2)
    }
    best = min(brute, key=brute.get)
    assert choice.chosen == list(best)
    assert choice.set_loss == pytest.approx(brute[best], rel=1e-4)


def test_greedy_grows_from_the_best_single_expert():
    model, batches = build_model("mixtral"), random_batches(2)
    views = find_moe_blocks(model)
    choices = select_experts(model, views, batches, 2, strategy="greedy")
    for view, choice in zip(views, choices, strict=True):
        first = min(range(view.num_experts), key=choice.losses.__getitem__)
        assert first in choice.chosen
        candidates = {
            e: brute_force_loss(model, view, batches, [first, e])
            for e in range(view.num_experts)
            if e != first
        }
        assert choice.set_loss == pytest.approx(min(candidates.values()), rel=1e-4)


def test_size_ratio_keeps_the_most_active_neurons():
    model, batches = build_model("qwen2_moe"), random_batches()
    views = find_moe_blocks(model)
    choices = select_experts(model, views, batches)
    view, choice = views[0], choices[0]
    inputs = block_inputs(model, view, batches)
    x = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(inputs, batches, strict=True)])
    gate, up, _ = view.expert_weights(choice.chosen[0])
    importance = (view.activation(x @ gate.T) * (x @ up.T)).abs().mean(0)
    assert torch.allclose(choice.importance[0], importance.detach(), atol=1e-6)
    graft = plan_grafts(views, choices, size_ratio=0.25)[0]
    assert graft.intermediate_sizes == [4]
    assert set(graft.neurons[0]) == set(importance.topk(4).indices.tolist())


def test_bad_selection_arguments_are_refused():
    model, batches = build_model("olmoe"), random_batches(1)
    views = find_moe_blocks(model)
    with pytest.raises(FlexMoEError, match="between 1 and 6"):
        select_experts(model, views, batches, experts_per_layer=7)
    with pytest.raises(FlexMoEError, match="unknown selection strategy"):
        select_experts(model, views, batches, strategy="best")
    with pytest.raises(FlexMoEError, match="data set is empty"):
        select_experts(model, views, [])
    with pytest.raises(FlexMoEError, match="size ratio"):
        plan_grafts(views, select_experts(model, views, batches), size_ratio=1.5)
