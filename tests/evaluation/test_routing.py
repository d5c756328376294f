"""Routing statistics checked against the routers' own forwards and hand-computed gate means."""

import json
import math
from dataclasses import replace

import pytest
import torch

from benchmarks.harness.summary import utilisation_shift
from flexmoe.evaluation.routing import routing_statistics
from flexmoe.flex import FlexConfig, FlexModel
from flexmoe.flex.graft import grafted_blocks
from flexmoe.flex.moe import find_moe_blocks
from flexmoe.results import LayerRouting, RoutingStatistics, to_plain
from tests.tiny_models import ARCHITECTURES, build_model, random_batches

ALL = sorted(ARCHITECTURES)


def captured_inputs(model, modules: dict[int, torch.nn.Module], batches) -> dict[int, torch.Tensor]:
    """The non-pad inputs ``[N, H]`` each module received, over all batches, via plain hooks."""
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in modules}
    keep: list[torch.Tensor] = []

    def hook_for(layer):
        return lambda _module, args: seen[layer].append(args[0][keep[-1]])

    handles = [m.register_forward_pre_hook(hook_for(layer)) for layer, m in modules.items()]
    with torch.no_grad():
        for batch in batches:
            keep.append(batch["attention_mask"].bool())
            model(**batch)
    for handle in handles:
        handle.remove()
    return {layer: torch.cat(xs) for layer, xs in seen.items()}


@pytest.mark.parametrize("model_type", ALL)
def test_utilisation_and_entropy_match_the_routers_own_forward(model_type):
    model, batches = build_model(model_type), random_batches()
    stats = routing_statistics(model, batches)
    views = find_moe_blocks(model)
    inputs = captured_inputs(model, {v.layer: v.block for v in views}, batches)
    assert [s.layer for s in stats.layers] == [v.layer for v in views]
    for view, layer in zip(views, stats.layers, strict=True):
        logits, _, indices = view.router(inputs[view.layer])
        counts = torch.bincount(indices.flatten(), minlength=view.num_experts).double()
        utilisation = torch.tensor(layer.utilisation, dtype=torch.float64)
        assert layer.tokens == 60 == len(inputs[view.layer])
        assert utilisation.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(utilisation, counts / counts.sum())
        scores = logits.softmax(-1) if view.rule.scoring == "softmax" else logits.sigmoid()
        p = scores / scores.sum(-1, keepdim=True)
        token_entropy = -(p * p.log()).sum(-1).mean().item()
        assert layer.token_entropy == pytest.approx(token_entropy, rel=1e-5)
        nonzero = utilisation[utilisation > 0]
        assert layer.utilisation_entropy == pytest.approx(-(nonzero * nonzero.log()).sum())
        assert layer.utilisation_entropy <= layer.max_entropy == math.log(view.num_experts)
        assert layer.gate_means == []
    json.dumps(to_plain(stats))


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_gate_means_are_sigmoid_gates_averaged_over_real_tokens(model_type):
    base, batches = build_model(model_type), random_batches()
    before = routing_statistics(base, batches)
    flex, _ = FlexModel.graft(base, batches, FlexConfig(experts_per_layer=2))
    blocks = grafted_blocks(flex.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in blocks:
            for gate in block.grafted_gates:
                gate.bias.normal_(generator=generator)
    stats = routing_statistics(flex.model, batches)
    layers = [g.layer for g in flex.grafts]
    inputs = captured_inputs(flex.model, dict(zip(layers, blocks, strict=True)), batches)
    for layer, block in zip(stats.layers, blocks, strict=True):
        x = inputs[layer.layer]
        by_hand = [torch.sigmoid(gate(x)).mean().item() for gate in block.grafted_gates]
        assert len(layer.gate_means) == 2
        assert layer.gate_means == pytest.approx(by_hand, rel=1e-5)
        assert min(by_hand) > 0.0 and max(by_hand) < 1.0
    # the first MoE layer sees the same tokens with or without grafts; later layers need not
    assert stats.layers[0].utilisation == before.layers[0].utilisation


def test_closed_gates_give_the_base_statistics():
    base, batches = build_model("olmoe"), random_batches()
    before = routing_statistics(base, batches)
    flex, _ = FlexModel.graft(base, batches)
    with torch.no_grad():
        for block in grafted_blocks(flex.model):
            block.grafted_gates[0].bias.fill_(float("-inf"))
    after = routing_statistics(flex.model, batches)
    for old, new in zip(before.layers, after.layers, strict=True):
        assert new.gate_means == [0.0]
        assert replace(new, gate_means=[]) == old
    assert list(utilisation_shift(before, after).values()) == [0.0, 0.0]


def test_utilisation_shift_is_total_variation():
    def statistics(utilisation: list[float]) -> RoutingStatistics:
        layer = LayerRouting(
            layer=3, num_experts=3, top_k=1, tokens=4, utilisation=utilisation,
            token_entropy=0.0, utilisation_entropy=0.0, max_entropy=1.0, gate_means=[],
        )  # fmt: skip
        return RoutingStatistics(layers=[layer])

    shift = utilisation_shift(statistics([0.5, 0.5, 0.0]), statistics([0.25, 0.25, 0.5]))
    assert shift == {3: 0.5}


def test_the_test_losss_forward_records_the_routing_a_forward_of_its_own_measures():
    from flexmoe.data import IGNORE_INDEX
    from flexmoe.evaluation.routing import RoutingRecorder
    from flexmoe.training import mean_loss

    torch.manual_seed(0)
    model = FlexModel.graft(build_model("olmoe"), random_batches())[0]
    batches = [
        {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE_INDEX)}
        for b in random_batches(2, seed=1)
    ]
    with RoutingRecorder(model) as recorder:
        mean_loss(model, batches)
    assert recorder.statistics() == routing_statistics(model, batches)
    assert recorder.statistics().layers[0].tokens == 2 * (12 + 8)  # non-pad tokens, once each


def test_the_bases_routing_on_the_same_test_batches_is_measured_once(monkeypatch, tmp_path):
    from flexmoe.evaluation import diagnostics

    monkeypatch.setenv("FLEXMOE_CACHE", str(tmp_path))
    calls = []
    measure = diagnostics.routing_statistics

    def counted(model, batches):
        calls.append(len(batches))
        return measure(model, batches)

    monkeypatch.setattr(diagnostics, "routing_statistics", counted)
    monkeypatch.setattr(diagnostics, "_heldout", lambda model, tokenizer: {"prose": 1.0})
    base = build_model("olmoe")
    first = diagnostics.measure_base(base, None, random_batches(2))
    again = diagnostics.measure_base(base, None, random_batches(2))
    other = diagnostics.measure_base(base, None, random_batches(1))
    assert calls == [2, 1]  # the same batches are read back; other batches measured
    assert first.routing == again.routing != other.routing
