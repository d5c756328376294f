"""Routing statistics per MoE layer: expert utilisation, routing entropy and grafted-gate openness.

FLEx freezes every router while the attention below it is fine-tuned, so the tokens a router sees,
and the experts it picks, can drift. For each MoE block this module reports, over non-pad tokens:

- ``utilisation``: the fraction of all top-k assignments that went to each expert (sums to 1);
- ``token_entropy``: the mean entropy (nats) of each token's routing distribution (the router's
  softmax, or its sigmoid scores normalised to sum to 1, before top-k);
- ``utilisation_entropy``: the entropy of ``utilisation`` (``log(E)`` when perfectly balanced);
- ``gate_means``: for a grafted block, the mean ``sigmoid(gate_j(x))`` of each grafted expert.

Block inputs are read by forward hooks as a forward passes (``RoutingRecorder``: the test loss's
forward measures the routing too); routing is then recomputed with the block's ``MoEBlockView``
(its router logits and checked routing rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flexmoe.data import on_model_device
from flexmoe.flex.graft import ADAPTER_DTYPE, GraftedMoEBlock, grafted_blocks
from flexmoe.flex.moe import MoEBlockView, find_moe_blocks
from flexmoe.flex.selection import Batch
from flexmoe.results import LayerRouting, RoutingStatistics


@dataclass
class _LayerTally:
    """Running sums for one MoE layer."""

    view: MoEBlockView
    grafted: GraftedMoEBlock | None
    assignments: torch.Tensor = field(init=False)
    gate_sums: torch.Tensor = field(init=False)
    entropy_sum: float = 0.0
    tokens: int = 0

    def __post_init__(self) -> None:
        self.assignments = torch.zeros(self.view.num_experts, dtype=torch.float64)
        gates = len(self.grafted.grafted_gates) if self.grafted is not None else 0
        self.gate_sums = torch.zeros(gates, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """Account for the non-pad block inputs ``x [N, H]``."""
        logits = self.view.router_logits(x)
        _, indices = self.view.rule.route(logits)
        counts = torch.bincount(indices.flatten(), minlength=len(self.assignments))
        self.assignments += counts.cpu()
        self.entropy_sum += entropy(self.view.rule.distribution(logits)).sum().item()
        self.tokens += len(x)
        if self.grafted is not None:
            self.gate_sums += torch.stack(
                [
                    torch.sigmoid(gate(x.to(ADAPTER_DTYPE))).sum()
                    for gate in self.grafted.grafted_gates
                ]
            ).to("cpu", torch.float64)

    def summary(self) -> LayerRouting:
        utilisation = self.assignments / self.assignments.sum().clamp(min=1)
        tokens = max(self.tokens, 1)
        return LayerRouting(
            layer=self.view.layer,
            num_experts=self.view.num_experts,
            top_k=self.view.rule.top_k,
            tokens=self.tokens,
            utilisation=utilisation.tolist(),
            token_entropy=self.entropy_sum / tokens,
            utilisation_entropy=entropy(utilisation).item(),
            max_entropy=math.log(self.view.num_experts),
            gate_means=(self.gate_sums / tokens).tolist(),
        )


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension (0 log 0 = 0)."""
    # in float64 on the host: accelerators such as MPS have no float64
    return torch.special.entr(probabilities.to("cpu", torch.float64)).sum(dim=-1)


class RoutingRecorder:
    """Routing statistics of every forward ``model`` runs while recording: hooks read each MoE
    block's non-pad inputs as they pass, so a forward run for another purpose (the test loss)
    measures routing too."""

    def __init__(self, model: nn.Module) -> None:
        views = find_moe_blocks(model)
        grafts = {id(g.block): g for g in grafted_blocks(model) if g.enabled}
        self.model = model
        self.views = views
        self.tallies = {v.layer: _LayerTally(v, grafts.get(id(v.block))) for v in views}
        self.mask: torch.Tensor | None = None
        self.handles: list = []

    def __enter__(self) -> RoutingRecorder:
        self.handles.append(self.model.register_forward_pre_hook(self._read_mask, with_kwargs=True))
        for view in self.views:
            hook = self._tally_hook(self.tallies[view.layer])
            self.handles.append(view.block.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _read_mask(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.mask = (mask if mask is not None else torch.ones_like(ids)).bool()

    def _tally_hook(self, tally: _LayerTally):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.reshape(*self.mask.shape, -1)
            with torch.no_grad():
                tally.add(hidden[self.mask])

        return hook

    def statistics(self) -> RoutingStatistics:
        return RoutingStatistics(layers=[self.tallies[n].summary() for n in sorted(self.tallies)])


@torch.no_grad()
def routing_statistics(model: nn.Module, batches: Sequence[Batch]) -> RoutingStatistics:
    """Per-layer routing statistics of ``model`` (base or grafted) over non-pad tokens."""
    was_training = model.training
    model.eval()
    with RoutingRecorder(model) as recorder:
        for batch in batches:
            batch = on_model_device(batch, model)
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
                logits_to_keep=1,  # only the MoE blocks' inputs are needed, not the vocabulary
            )
    model.train(was_training)
    return recorder.statistics()
