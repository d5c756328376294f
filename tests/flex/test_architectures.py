"""MoE architectures beyond the tested list: the modelled rules where they apply, the router run
as written (``RouterForward``) where they do not, and a clear refusal where neither can."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from flexmoe.cli import main
from flexmoe.errors import FlexMoEError
from flexmoe.flex.moe import MASKED_LOGIT, RouterForward, RoutingRule, find_moe_blocks
from flexmoe.flex.selection import select_experts
from tests.flex.test_selection import RouteOnly, block_inputs, brute_force_loss
from tests.tiny_models import OTHER_ARCHITECTURES, build_model, random_batches, save_model


@pytest.mark.parametrize("model_type", [t for t in OTHER_ARCHITECTURES if t != "phimoe"])
def test_selection_equals_brute_force_beyond_the_tested_list(model_type):
    model, batches = build_model(model_type), random_batches()
    views = find_moe_blocks(model)
    assert all(isinstance(v.rule, RoutingRule) for v in views)  # modelled: one pass
    for view, choice in zip(views, select_experts(model, views, batches), strict=True):
        brute = [brute_force_loss(model, view, batches, [e]) for e in range(view.num_experts)]
        assert choice.losses == pytest.approx(brute, rel=1e-4, abs=1e-6)


@torch.no_grad()
def own_code_loss(view, inputs, batches, experts) -> float:
    """Through the block's own router and experts modules: router logits outside ``experts`` at
    a finite floor (sparsemixer gives NaN at -inf when fewer than top-k remain) and any weight
    it still gives them dropped."""
    allowed = torch.zeros(view.num_experts, dtype=torch.bool)
    allowed[list(experts)] = True
    total = 0.0
    for x, batch in zip(inputs, batches, strict=True):
        x = x.reshape(-1, view.hidden_size)
        _, weights, indices = view.router(x)
        full = view.experts(x, indices, weights)
        with RouteOnly(view.router.weight, allowed, fill=MASKED_LOGIT):
            _, weights, indices = view.router(x)
        limited = view.experts(x, indices, weights * allowed[indices])
        total += (full - limited)[batch["attention_mask"].flatten().bool()].norm().item()
    return total


def test_phimoe_sparsemixer_is_scored_through_its_own_router():
    model, batches = build_model("phimoe"), random_batches()
    views = find_moe_blocks(model)
    assert all(isinstance(v.rule, RouterForward) for v in views)
    assert "PhimoeTopKRouter's own forward, top-2" in views[0].rule.describe()
    for view, choice in zip(views, select_experts(model, views, batches), strict=True):
        inputs = block_inputs(model, view, batches)
        own = [own_code_loss(view, inputs, batches, [e]) for e in range(view.num_experts)]
        assert choice.losses == pytest.approx(own, rel=1e-4, abs=1e-6)
        assert len(set(own)) == len(own)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_a_router_run_as_written_scores_as_its_modelled_rule(model_type):
    model, batches = build_model(model_type), random_batches(2)
    views = find_moe_blocks(model)
    written = [replace(v, rule=RouterForward(v.rule.top_k, v.router, v.router_args)) for v in views]
    modelled = select_experts(model, views, batches, 2, "exhaustive")  # singletons and pairs
    traced = select_experts(model, written, batches, 2, "exhaustive")
    for a, b in zip(modelled, traced, strict=True):
        assert (a.chosen, a.set_loss) == (b.chosen, pytest.approx(b.set_loss, rel=1e-5))
        assert a.losses == pytest.approx(b.losses, rel=1e-5)


def test_an_unmodelled_rule_takes_the_router_as_written(monkeypatch):
    model, batches = build_model("olmoe"), random_batches()
    router_class = type(model.model.layers[0].mlp.gate)
    original = router_class.forward

    def squared(self, hidden_states):
        logits, weights, indices = original(self, hidden_states)
        return logits, weights * weights, indices

    monkeypatch.setattr(router_class, "forward", squared)
    views = find_moe_blocks(model)
    assert all(isinstance(v.rule, RouterForward) for v in views)
    for view, choice in zip(views, select_experts(model, views, batches), strict=True):
        brute = [brute_force_loss(model, view, batches, [e]) for e in range(view.num_experts)]
        assert choice.losses == pytest.approx(brute, rel=1e-4, abs=1e-6)


def test_a_router_whose_logits_cannot_be_replaced_is_refused(monkeypatch):
    model = build_model("olmoe")
    router_class = type(model.model.layers[0].mlp.gate)

    def hidden_weight(self, hidden_states):  # its weight applied by einsum, its rule squared
        logits = torch.einsum("nh,eh->ne", hidden_states.reshape(-1, self.hidden_dim), self.weight)
        weights, indices = F.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        return logits, weights * weights, indices

    monkeypatch.setattr(router_class, "forward", hidden_weight)
    with pytest.raises(FlexMoEError, match="its logits cannot be replaced inside it"):
        find_moe_blocks(model)


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("deepseek_v4", "routes by input_ids as well as the hidden states"),
        ("minimax_m3_vl_text", "has no activation module 'act_fn'"),
    ],
)
def test_what_neither_path_can_score_is_refused_in_one_line(model_type, reason):
    with pytest.raises(FlexMoEError, match=reason):
        find_moe_blocks(build_model(model_type))


@pytest.mark.parametrize("model_type", ["phimoe", "minimax_m2", "qwen3_next"])
def test_flexmoe_graft_and_info_beyond_the_tested_list(model_type, alpaca_file, tmp_path, capsys):
    folder = save_model(tmp_path / model_type, model_type)
    out = tmp_path / "adapter"
    assert (
        main(["graft", "--model", str(folder), "--data", str(alpaca_file), "--out", str(out)]) == 0
    )
    report = json.loads((out / "graft_report.json").read_text())
    for layer in report["layers"]:
        assert layer["chosen"] == [min(range(6), key=layer["losses"].__getitem__)]
    assert main(["info", str(folder)]) == 0
    path = "own forward" if model_type == "phimoe" else "modelled"
    assert path in capsys.readouterr().out
