"""One uniform view of the sparse MoE blocks of any transformers 5.x model with fused experts.

A block qualifies when it holds an experts module with fused 3-D ``gate_up_proj`` ``[E, 2I, H]``
(gate rows first) and ``down_proj`` ``[E, H, I]`` parameters, and a router module whose
``weight`` is ``[E, H]``. The routing rule (softmax or sigmoid scoring, top-k, normalisation,
scaling, grouped top-k with a score-correction bias) is read off the router's attributes and then
*checked against the router's own forward* on random inputs, so an architecture with the same
layout works without new code and one with a different rule is refused instead of mis-modelled.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.errors import FlexMoEError

ROUTER_NAMES = ("gate", "router")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_GATE_NAMES = ("shared_expert_gate",)
LAYOUT_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}  # else 1e-3
TESTED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v3", "glm4_moe")


@dataclass(frozen=True)
class RoutingRule:
    """How a router turns logits ``[N, E]`` into top-k expert weights."""

    top_k: int
    scoring: str = "softmax"  # "softmax" or "sigmoid"
    normalize: bool = False
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    bias: torch.Tensor | None = None  # score-correction bias, used for choice only

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(weights, indices)`` of shape ``[..., top_k]``, as the router would."""
        logits = logits.float()
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.bias is None else scores + self.bias.float()
        if self.n_group > 1:
            choice = self._mask_groups(choice)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, indices

    def dense(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Dense routing weights ``[..., E]``; experts outside ``allowed`` get logit -inf."""
        if allowed is not None:
            logits = logits.float().masked_fill(~allowed, float("-inf"))
        weights, indices = self.route(logits)
        dense = torch.zeros(logits.shape, dtype=weights.dtype, device=weights.device)
        return dense.scatter(-1, indices, weights)

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        grouped = choice.unflatten(-1, (self.n_group, -1))
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(-1, group_scores.topk(self.topk_group, dim=-1).indices, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).flatten(-2)
        return choice.masked_fill(~keep, float("-inf"))


@dataclass
class MoEBlockView:
    """A sparse MoE block seen uniformly: router, rule, routed experts and any shared expert."""

    layer: int
    path: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    rule: RoutingRule
    shared_expert: nn.Module | None
    shared_expert_gate: nn.Module | None

    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.experts.down_proj.shape[-1]

    @property
    def hidden_size(self) -> int:
        return self.experts.down_proj.shape[1]

    @property
    def activation(self) -> nn.Module:
        return self.experts.act_fn

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert ``e`` as ``(gate [I, H], up [I, H], down [H, I])`` in ``nn.Linear`` order."""
        size = self.intermediate_size
        gate_up = self.experts.gate_up_proj[e]
        return gate_up[:size], gate_up[size:], self.experts.down_proj[e]

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # routing's near-ties need float32
            return F.linear(x.float(), self.router.weight.float())

    def expert_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Intermediate activations of every expert on tokens ``x [N, H]``: ``[E, N, I]``."""
        gate_up = torch.einsum("nh,eih->eni", x, self.experts.gate_up_proj)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.activation(gate) * up

    def expert_outputs(self, activations: torch.Tensor) -> torch.Tensor:
        """Every expert's output ``[E, N, H]`` from its intermediate activations."""
        return torch.einsum("eni,ehi->enh", activations, self.experts.down_proj)

    def routed_output(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' part of the block output, through the model's own modules."""
        _, weights, indices = self.router(x)
        return self.experts(x, indices, weights)


def exact_routers(model: nn.Module) -> None:
    """Make every router of ``model`` compute outside autocast, as the model wrote it (most
    upcast to float32): under a bfloat16 autocast their logits would round, and near-ties would
    send tokens to other experts. Once per model, as it is loaded; the weights are untouched."""
    for view in find_moe_blocks(model):
        view.router.forward = _outside_autocast(view.router.forward, view.router.weight)


def _outside_autocast(forward, weight: torch.Tensor):
    @functools.wraps(forward)
    def exact(hidden: torch.Tensor, *args, **kwargs):
        with torch.autocast(weight.device.type, enabled=False):
            return forward(hidden.to(weight.dtype), *args, **kwargs)

    return exact


def find_moe_blocks(model: nn.Module) -> list[MoEBlockView]:
    """Every sparse MoE block of ``model``, validated; refuses models without any.

    A model on the meta device (shapes, no values) cannot run: its layout is read unchecked,
    and its routing rule is the first candidate, right in top-k, unchecked in its scoring.
    """
    views = []
    for path, module in model.named_modules():
        experts = _fused_experts(module)
        if experts is None:
            continue
        router = _router(module, experts)
        if router is None:
            continue
        views.append(_make_view(model, path, module, router, experts))
    if not views:
        raise FlexMoEError(
            f"model type {_model_type(model)!r} has no sparse MoE block with fused experts. "
            f"flexmoe supports transformers 5.x MoE models whose experts are fused "
            f"'gate_up_proj'/'down_proj' parameters with a router named 'gate' or 'router' "
            f"(tested: {', '.join(TESTED_MODEL_TYPES)}); a dense model cannot be grafted: carve "
            "it into experts first with `flexmoe carve`."
        )
    return views


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def _fused_experts(module: nn.Module) -> nn.Module | None:
    for child in module.children():
        gate_up = getattr(child, "gate_up_proj", None)
        down = getattr(child, "down_proj", None)
        fused = isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
        if fused and gate_up.dim() == 3 and down.dim() == 3:
            return child
    return None


def _router(block: nn.Module, experts: nn.Module) -> nn.Module | None:
    num_experts, hidden = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[-1]
    candidates = [getattr(block, name, None) for name in ROUTER_NAMES]
    candidates += [child for child in block.children() if child is not experts]
    for candidate in candidates:
        weight = getattr(candidate, "weight", None)
        if isinstance(weight, nn.Parameter) and tuple(weight.shape) == (num_experts, hidden):
            return candidate
    return None


def _first_attr(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(module, n) for n in names if hasattr(module, n)), None)


def _layer_index(path: str) -> int:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    if match is None:
        raise FlexMoEError(f"cannot tell the layer index of MoE block {path!r}")
    return int(match.group(1))


def _make_view(
    model: nn.Module,
    path: str,
    block: nn.Module,
    router: nn.Module,
    experts: nn.Module,
) -> MoEBlockView:
    def view(rule: RoutingRule) -> MoEBlockView:
        return MoEBlockView(
            layer=_layer_index(path),
            path=path,
            block=block,
            router=router,
            experts=experts,
            rule=rule,
            shared_expert=_first_attr(block, SHARED_EXPERT_NAMES),
            shared_expert_gate=_first_attr(block, SHARED_GATE_NAMES),
        )

    if router.weight.is_meta:  # nothing to run: the first candidate rule, unchecked
        return view(_candidate_rules(model, block, router)[0])
    # checked against the model's own computation in its precision, never a mixed one
    with torch.autocast(router.weight.device.type, enabled=False):
        checked = view(_infer_rule(model, block, router))
        _check_expert_layout(model, checked)
    return checked


def _candidate_rules(model: nn.Module, block: nn.Module, router: nn.Module) -> list[RoutingRule]:
    config = getattr(model, "config", None)
    top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None)
    top_k = top_k or getattr(config, "num_experts_per_tok", None)
    if top_k is None:
        raise FlexMoEError(f"cannot tell top-k of router {type(router).__name__}")
    base = RoutingRule(
        top_k=int(top_k),
        scale=float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
        n_group=int(getattr(router, "num_group", None) or getattr(router, "n_group", 1) or 1),
        topk_group=int(getattr(router, "topk_group", 1) or 1),
        bias=getattr(router, "e_score_correction_bias", None),
    )
    norm = getattr(router, "norm_topk_prob", None)
    norms = (bool(norm),) if norm is not None else (True, False)
    return [
        replace(base, scoring=scoring, normalize=n)
        for scoring, n in itertools.product(("softmax", "sigmoid"), norms)
    ]


@torch.no_grad()
def _infer_rule(model: nn.Module, block: nn.Module, router: nn.Module) -> RoutingRule:
    # checked in float32 on a copy of the (small) router: a bf16 router's near-ties would
    # otherwise make the right rule look wrong
    probe = copy.deepcopy(router).float()
    x = torch.randn(64, router.weight.shape[-1], generator=torch.Generator().manual_seed(0))
    # the class's forward: a copy of a router that exact_routers wrapped would call the original
    logits, weights, indices = type(probe).forward(probe, x.to(probe.weight.device))
    actual = torch.zeros(logits.shape, device=logits.device)
    actual = actual.scatter(-1, indices.long(), weights.float())
    for rule in _candidate_rules(model, block, probe):
        if torch.allclose(rule.dense(logits), actual, atol=1e-5, rtol=1e-4):
            return replace(rule, bias=getattr(router, "e_score_correction_bias", None))
    raise FlexMoEError(
        f"router {type(router).__name__} of model type {_model_type(model)!r} uses a routing rule "
        "flexmoe does not model (softmax or sigmoid top-k, optional normalisation, scaling and "
        f"grouped top-k are supported; tested: {', '.join(TESTED_MODEL_TYPES)})"
    )


@torch.no_grad()
def _check_expert_layout(model: nn.Module, view: MoEBlockView) -> None:
    weight = view.experts.down_proj
    x = torch.randn(4, view.hidden_size, generator=torch.Generator().manual_seed(1))
    x = x.to(device=weight.device, dtype=weight.dtype)
    last = view.num_experts - 1
    ours = view.expert_outputs(view.expert_activations(x))[last].float()
    index = torch.full((4, 1), last, dtype=torch.long, device=weight.device)
    theirs = view.experts(x, index, torch.ones(4, 1, dtype=x.dtype, device=x.device)).float()
    # relative to the output's size: a wrong layout is off by about 1, rounding by ~eps
    error = (ours - theirs).norm() / theirs.norm().clamp_min(1e-12)
    if not error <= LAYOUT_TOLERANCE.get(weight.dtype, 1e-3):
        raise FlexMoEError(
            f"experts module {type(view.experts).__name__} of model type "
            f"{_model_type(model)!r} does not compute act(gate) * up -> down from fused "
            "'gate_up_proj' (gate rows first) and 'down_proj'; this expert layout is unsupported"
        )
