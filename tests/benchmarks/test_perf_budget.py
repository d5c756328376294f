"""The perf budget study's arithmetic: each draw's losses, summed from every token's criterion
computed once, are the losses ``select_experts`` scores with that budget and seed."""

import torch

from benchmarks.perf import perf
from flexmoe.flex.moe import exact_routers, find_moe_blocks
from flexmoe.flex.selection import select_experts
from flexmoe.models.loading import load_model


def test_a_draw_of_every_tokens_criterion_gives_the_losses_that_selection_scores():
    base, tokenizer = load_model("tiny", perf.CPU32)
    exact_routers(base)
    views = find_moe_blocks(base)
    batches = perf.selection_batches(tokenizer, perf.dolly_sample(2, test=False))
    assert all("labels" in batch for batch in batches)  # as a run batches them
    errors = perf.token_errors_by_batch(base, views, batches)
    for budget, seed in ((0, 0), (300, 1), (300, 2)):
        drawn = perf.drawn_tokens(batches, budget, seed)
        chosen = select_experts(base, views, batches, seed=seed, token_budget=budget)
        for view, choice in zip(views, chosen, strict=True):
            losses = perf.budget_losses(errors[view.layer], drawn)
            torch.testing.assert_close(
                losses.float(), torch.tensor(choice.losses), rtol=1e-4, atol=0
            )
            assert int(losses.argmin()) == choice.chosen[0]
