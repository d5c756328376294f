"""Model surgery: graft trainable copies of chosen experts beside their MoE blocks.

A grafted block computes ``y = block(x) + sum_j sigmoid(w_j . x + b_j) * G_j(x)``: the pretrained
block is untouched and every grafted expert G_j is always active behind its own per-token sigmoid
gate (the shape of Qwen-MoE's gated shared expert). The gate starts from the source expert's
router row and a bias (0 by default), so at first it opens where the router already favoured that
expert; a negative bias starts it nearly closed, close to the base model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flexmoe.errors import FlexMoEError
from flexmoe.flex.moe import MoEBlockView, find_moe_blocks
from flexmoe.flex.selection import LayerChoice

PERSONAL_PREFIX = "grafted_"  # every personal parameter name contains it
# trained adapters keep float32 master weights whatever the frozen base's dtype, so that small
# updates are not rounded away in bfloat16
ADAPTER_DTYPE = torch.float32


@dataclass(frozen=True)
class LayerGraft:
    """What is grafted in one layer: source experts and the neurons kept of each."""

    layer: int
    source_experts: tuple[int, ...]
    neurons: tuple[tuple[int, ...], ...]
    losses: tuple[float, ...] = ()  # the criterion L({e}) of every expert when grafted

    @property
    def intermediate_sizes(self) -> list[int]:
        return [len(n) for n in self.neurons]

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "source_experts": list(self.source_experts),
            "intermediate_sizes": self.intermediate_sizes,
            "neurons": [list(n) for n in self.neurons],
            "losses": list(self.losses),
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerGraft:
        """A graft as ``to_dict`` wrote it; a TypeError names a field of the wrong type."""
        neurons = tuple(_whole_numbers(n, "neurons") for n in data["neurons"])
        [layer] = _whole_numbers([data["layer"]], "layer")
        losses = data.get("losses", [])  # adapters saved before losses were kept have none
        if not isinstance(losses, list) or not all(isinstance(x, int | float) for x in losses):
            raise TypeError("field 'losses' must be a list of numbers")
        experts = _whole_numbers(data["source_experts"], "source_experts")
        return cls(layer, experts, neurons, tuple(float(x) for x in losses))


def _whole_numbers(values: object, field: str) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise TypeError(f"{field} must hold whole numbers, got {values!r:.40}")
    return tuple(values)


class GraftedExpert(nn.Module):
    """A gated MLP expert, ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    @classmethod
    @torch.no_grad()
    def copy_of(cls, view: MoEBlockView, expert: int, neurons: Sequence[int]) -> GraftedExpert:
        """A trainable copy of ``expert`` keeping only the intermediate ``neurons``."""
        gate, up, down = view.expert_weights(expert)
        keep = torch.as_tensor(neurons, dtype=torch.long)
        with torch.device(down.device):  # made where it will live: no host copy of a GPU expert
            grafted = cls(view.hidden_size, len(keep), view.activation).to(ADAPTER_DTYPE)
        grafted.gate_proj.weight.copy_(gate[keep])
        grafted.up_proj.weight.copy_(up[keep])
        grafted.down_proj.weight.copy_(down[:, keep])
        return grafted


class GraftedMoEBlock(nn.Module):
    """A sparse MoE block plus gated personal experts, always active."""

    def __init__(
        self, block: nn.Module, experts: Sequence[GraftedExpert], gates: Sequence[nn.Linear]
    ):
        super().__init__()
        self.block = block
        self.grafted_experts = nn.ModuleList(experts)
        self.grafted_gates = nn.ModuleList(gates)
        self.enabled = True  # False: computes the pretrained block alone

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        output = self.block(hidden_states, *args, **kwargs)
        if not self.enabled:
            return output
        x = hidden_states.to(ADAPTER_DTYPE)
        extra = sum(
            torch.sigmoid(gate(x)) * expert(x)
            for gate, expert in zip(self.grafted_gates, self.grafted_experts, strict=True)
        )
        if isinstance(output, tuple):
            return (output[0] + extra.to(output[0].dtype), *output[1:])
        return output + extra.to(output.dtype)


def plan_grafts(
    views: Sequence[MoEBlockView], choices: Sequence[LayerChoice], size_ratio: float = 1.0
) -> list[LayerGraft]:
    """Turn selection results into grafts, keeping the ``size_ratio`` most active neurons."""
    if not 0.0 < size_ratio <= 1.0:
        raise FlexMoEError(f"size ratio must be in (0, 1], got {size_ratio}")
    by_layer = {c.layer: c for c in choices}
    grafts = []
    for view in views:
        choice = by_layer[view.layer]
        keep = max(1, math.ceil(size_ratio * view.intermediate_size))
        neurons = tuple(
            tuple(sorted(importance.topk(keep).indices.tolist()))
            for importance in choice.importance
        )
        grafts.append(LayerGraft(view.layer, tuple(choice.chosen), neurons, tuple(choice.losses)))
    return grafts


def apply_grafts(
    model: nn.Module,
    grafts: Sequence[LayerGraft],
    gate_bias: float = 0.0,
    gate_with_bias: bool = True,
) -> None:
    """Wrap every grafted layer's MoE block in place, copying the source experts; the gates
    start from their router rows and ``gate_bias`` (none without ``gate_with_bias``)."""
    views = {v.layer: v for v in find_moe_blocks(model)}
    for graft in grafts:
        view = views.get(graft.layer)
        if view is None:
            raise FlexMoEError(f"layer {graft.layer} has no MoE block to graft onto")
        _check_in_range(graft, view)
        parent_path, _, attr = view.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if isinstance(parent, GraftedMoEBlock):
            raise FlexMoEError(f"layer {graft.layer} is already grafted")
        experts = [
            GraftedExpert.copy_of(view, e, n)
            for e, n in zip(graft.source_experts, graft.neurons, strict=True)
        ]
        gates = [
            _gate_from_router(view, e, gate_bias, gate_with_bias) for e in graft.source_experts
        ]
        setattr(parent, attr, GraftedMoEBlock(view.block, experts, gates))


def _check_in_range(graft: LayerGraft, view: MoEBlockView) -> None:
    if len(graft.source_experts) != len(graft.neurons):
        raise FlexMoEError(f"layer {graft.layer} lists a different number of experts and neurons")
    for expert, neurons in zip(graft.source_experts, graft.neurons, strict=True):
        if not 0 <= expert < view.num_experts:
            raise FlexMoEError(
                f"layer {graft.layer} has experts 0..{view.num_experts - 1}, not {expert}"
            )
        if not neurons or not all(0 <= n < view.intermediate_size for n in neurons):
            raise FlexMoEError(
                f"layer {graft.layer}: expert {expert}'s kept neurons must be in "
                f"0..{view.intermediate_size - 1}"
            )


@torch.no_grad()
def _gate_from_router(
    view: MoEBlockView, expert: int, bias: float, with_bias: bool = True
) -> nn.Linear:
    weight = view.router.weight
    with torch.device(weight.device):
        gate = nn.Linear(view.hidden_size, 1, bias=with_bias).to(ADAPTER_DTYPE)
    gate.weight.copy_(weight[expert : expert + 1])
    if with_bias:
        gate.bias.fill_(bias)
    return gate


def grafted_blocks(model: nn.Module) -> list[GraftedMoEBlock]:
    return [m for m in model.modules() if isinstance(m, GraftedMoEBlock)]


def remove_grafts(model: nn.Module) -> None:
    """Put every grafted block's pretrained block back in its place (undoes ``apply_grafts``)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, GraftedMoEBlock):
            model.set_submodule(path, module.block)
