"""The price of K+1 experts: analytic MoE FLOPs per token, and measured forward latency.

FLOPs count multiply-adds as 2 per weight of every matmul a token goes through, in the MoE blocks
only (attention, embeddings and dense layers are the same with or without grafts):

- router: ``2 H E``; routed experts: ``top_k x 3 x 2 H I`` (gate, up and down projections);
- shared expert and its gate, where the block has them: ``2 x`` their linear weights;
- each grafted expert: ``3 x 2 H I_g``, plus its gate ``2 H``.

Element-wise work (activations, softmax, top-k, the weighted sum) is left out.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from flexmoe.data import on_model_device
from flexmoe.errors import FlexMoEError
from flexmoe.flex.graft import GraftedMoEBlock, grafted_blocks
from flexmoe.flex.moe import MoEBlockView, find_moe_blocks
from flexmoe.flex.selection import Batch
from flexmoe.hardware import Stopwatch

if TYPE_CHECKING:
    from flexmoe.flex.model import FlexModel


def linear_flops(module: nn.Module | None) -> int:
    """FLOPs per token of every ``nn.Linear`` in ``module``: 2 per weight."""
    if module is None:
        return 0
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _layer_flops(view: MoEBlockView, grafted: GraftedMoEBlock | None) -> dict:
    """One MoE layer's FLOPs per token by part; ``experts_per_token`` is routed + grafted."""
    hidden = view.hidden_size
    experts, gates = (grafted.grafted_experts, grafted.grafted_gates) if grafted else ([], [])
    router = 2 * hidden * view.num_experts
    routed = view.rule.top_k * 3 * 2 * hidden * view.intermediate_size
    shared = linear_flops(view.shared_expert) + linear_flops(view.shared_expert_gate)
    graft = sum(linear_flops(module) for module in (*experts, *gates))
    base = router + routed + shared
    return {
        "layer": view.layer,
        "router": router,
        "routed": routed,
        "shared": shared,
        "grafted": graft,
        "experts_per_token": view.rule.top_k + len(experts),
        "base": base,
        "personalised": base + graft,
    }


def flops_per_token(model: nn.Module) -> dict:
    """MoE FLOPs per token without and with the grafted experts, per layer and in total."""
    grafts = {id(g.block): g for g in grafted_blocks(model)}
    layers = [_layer_flops(v, grafts.get(id(v.block))) for v in find_moe_blocks(model)]
    base = sum(layer["base"] for layer in layers)
    personalised = sum(layer["personalised"] for layer in layers)
    return {
        "base": base,
        "personalised": personalised,
        "ratio": personalised / base,
        "layers": layers,
    }


def grafting_flops(model: nn.Module) -> dict:
    """What grafting computes per token, counted as above: the ``forward`` it runs over every
    selection token (every ``nn.Linear`` but the output head, which selection skips, plus the
    MoE blocks), and the ``scoring`` of every expert on each scored token in every MoE layer (the
    router twice, all E experts, the routed output again, and mixing each candidate's weights)."""
    views = find_moe_blocks(model)
    inside = {id(m) for v in views for m in v.block.modules()}
    head = model.get_output_embeddings()
    dense = sum(
        2 * m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m) not in inside and m is not head
    )
    moe = sum(_layer_flops(v, None)["base"] for v in views)
    scoring = sum(
        2 * v.hidden_size * v.num_experts * (2 + v.num_experts)
        + (v.num_experts + v.rule.top_k) * 3 * 2 * v.hidden_size * v.intermediate_size
        for v in views
    )
    return {"forward": dense + moe, "scoring": scoring}


def grafting_forwards(flops: dict, selection_tokens: int, scored_tokens: int) -> float:
    """Grafting's compute as a multiple of one forward over its ``selection_tokens``."""
    return 1 + scored_tokens * flops["scoring"] / (selection_tokens * flops["forward"])


@torch.no_grad()
def _forward_seconds(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Wall-clock seconds of one forward over every batch."""
    batches = [on_model_device(batch, model) for batch in batches]  # not timed
    clock = Stopwatch(next(model.parameters()).device)
    with clock.lap("forward"):
        for batch in batches:
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            )
    return clock.seconds["forward"]


def latency_ratio(model: FlexModel, batches: Sequence[Batch], repeats: int = 5) -> dict:
    """Median forward seconds of ``model`` and of it computing as its base (grafts and LoRA
    switched off, ``base_only``) on the same batches, interleaved, and their ratio.

    One model serves both, so a model of billions of parameters is never held twice; the base's
    side still passes through the switched-off wrappers (a few Python calls a layer).
    """
    if repeats < 1 or not batches:
        raise FlexMoEError(f"need at least one batch and one repeat, got {len(batches)}, {repeats}")
    model.model.eval()
    sides = {"personalised": contextlib.nullcontext, "base": model.base_only}
    for side in sides.values():
        with side():
            _forward_seconds(model.model, batches[:1])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            with sides[name]():
                seconds[name].append(_forward_seconds(model.model, batches))
    medians = {f"{name}_s": statistics.median(values) for name, values in seconds.items()}
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    ratio = medians["personalised_s"] / medians["base_s"]
    return {**medians, "ratio": ratio, "repeats": repeats, "tokens": tokens}


def price_of_grafts(model: FlexModel, batches: Sequence[Batch], repeats: int = 5) -> dict:
    """What the grafted experts cost: FLOPs per token computed, and forward latency measured."""
    flops = flops_per_token(model.model)
    per_token = [layer["experts_per_token"] for layer in flops["layers"]]
    return {
        "experts_per_token": statistics.fmean(per_token),
        "flops_base": flops["base"],
        "flops_personalised": flops["personalised"],
        "flops_ratio": flops["ratio"],
        "latency": latency_ratio(model, batches, repeats),
    }
