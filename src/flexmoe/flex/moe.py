"""One uniform view of the sparse MoE blocks of any transformers 5.x model with fused experts.

A block qualifies when it holds an experts module with fused 3-D ``gate_up_proj`` ``[E, 2I, H]``
(gate rows first) and ``down_proj`` ``[E, H, I]`` parameters, and a router module whose
``weight`` is ``[E, H]``. The routing rule (softmax or sigmoid scoring, top-k, normalisation,
scaling, grouped top-k with a score-correction bias) is read off the router's attributes and then
*checked against the router's own forward* on random inputs, so an architecture with the same
layout works without new code. A router whose rule is none of these (Phi-MoE's sparsemixer, say)
is run as the model wrote it (``RouterForward``): its linear logits are replaced, inside its own
forward, by the logits to route (masked to a candidate set), which is exact and slower. Only a
router that even that cannot drive (one routing by token ids, say) is refused.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from flexmoe.errors import FlexMoEError

ROUTER_NAMES = ("gate", "router")
MASKED_LOGIT = -1e30  # an expert outside the candidate set, for a router run as written
BIAS = "e_score_correction_bias"  # a router's bias added to scores for the choice only
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_GATE_NAMES = ("shared_expert_gate",)
LAYOUT_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}  # else 1e-3
TESTED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v3", "glm4_moe")


class Routing:
    """How a router turns logits ``[..., E]`` into top-k expert weights (``route``)."""

    top_k: int

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, indices)`` of shape ``[..., top_k]``, as the router would."""
        raise NotImplementedError

    def logits(self, router: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The router's logits ``[N, E]`` for tokens ``x [N, H]``, in float32."""
        with torch.autocast(x.device.type, enabled=False):  # routing's near-ties need float32
            return F.linear(x.float(), router.weight.float())

    def dense(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Dense routing weights ``[..., E]``; experts outside ``allowed`` get logit -inf."""
        if allowed is not None:
            logits = logits.float().masked_fill(~allowed, float("-inf"))
        weights, indices = self.route(logits)
        dense = torch.zeros(logits.shape, dtype=weights.dtype, device=weights.device)
        return dense.scatter(-1, indices, weights)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """Each token's distribution over experts (for routing entropy): softmax by default."""
        return logits.float().softmax(dim=-1)

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class RoutingRule(Routing):
    """A rule flexmoe models: softmax or sigmoid scores, top-k, normalisation, scaling, grouped
    top-k with a score-correction bias."""

    top_k: int
    scoring: str = "softmax"  # "softmax" or "sigmoid"
    normalize: bool = False
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    bias: torch.Tensor | None = None  # score-correction bias, used for choice only

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax, or sigmoid scores normalised to 1."""
        if self.scoring == "softmax":
            return super().distribution(logits)
        scores = logits.float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)

    def describe(self) -> str:
        grouped = f", best {self.topk_group} of {self.n_group} groups" if self.n_group > 1 else ""
        return (
            f"{self.scoring} top-{self.top_k}{grouped}, normalised: {self.normalize}, "
            f"scale {self.scale:g}{', score-correction bias' if self.bias is not None else ''} "
            "(modelled: candidates scored in one pass)"
        )

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        grouped = choice.unflatten(-1, (self.n_group, -1))
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(-1, group_scores.topk(self.topk_group, dim=-1).indices, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).flatten(-2)
        return choice.masked_fill(~keep, float("-inf"))


@dataclass(frozen=True, eq=False)
class RouterForward(Routing):
    """A router whose rule flexmoe does not model, run as the model wrote it: inside its own
    forward, the output of the op applying its weight is replaced by the logits to route. Exact
    for any rule that depends on the tokens only through those logits; slower than a modelled
    rule (the router runs once per candidate set)."""

    top_k: int
    router: nn.Module
    args: tuple = ()  # what its block passes its forward beyond the hidden states

    def logits(self, router: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with (
            _RouterWeightOp(self.router.weight) as op,
            torch.autocast(x.device.type, enabled=False),
        ):
            type(self.router).forward(self.router, x, *self.args)
        return op.output.float()

    @torch.no_grad()
    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = logits.reshape(-1, logits.shape[-1])
        weight = self.router.weight
        placeholder = torch.zeros(
            len(flat), weight.shape[-1], dtype=weight.dtype, device=weight.device
        )
        with _RouterWeightOp(weight, flat) as op, torch.autocast(weight.device.type, enabled=False):
            _, weights, indices = type(self.router).forward(self.router, placeholder, *self.args)
        if not op.seen:
            raise FlexMoEError(f"router {type(self.router).__name__} stopped using its weight")
        shape = (*logits.shape[:-1], weights.shape[-1])
        return weights.float().reshape(shape), indices.long().reshape(shape)

    def dense(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """As ``Routing.dense``, with experts outside ``allowed`` at a finite floor instead of -inf
        (a rule may give NaN when fewer than top-k experts remain, as sparsemixer does) and
        dropped from the result whatever weight the rule still gives them."""
        if allowed is None:
            return super().dense(logits)
        floored = logits.float().masked_fill(~allowed, MASKED_LOGIT)
        return super().dense(floored) * allowed

    def describe(self) -> str:
        return (
            f"{type(self.router).__name__}'s own forward, top-{self.top_k} (a rule flexmoe does "
            "not model: each candidate set routed through it, exact and slower)"
        )


class _RouterWeightOp(TorchFunctionMode):
    """Finds the op that applies a router's ``weight`` (``F.linear``, or a matmul by its
    transpose) and keeps its output, or replaces it by ``swap``."""

    MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)

    def __init__(self, weight: torch.Tensor, swap: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight, self.swap = weight, swap
        self.seen, self.output = 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._applies_weight(func, args):
            self.seen += 1
            if self.swap is not None:
                out = self.swap.to(out.device)
            self.output = out
        return out

    def _applies_weight(self, func, args) -> bool:
        if len(args) < 2 or not isinstance(args[1], torch.Tensor):
            return False
        if func is F.linear:
            return _same(args[1], self.weight)
        return func in self.MATMULS and _same(args[1], self.weight.T)


def _same(tensor: torch.Tensor, weight: torch.Tensor) -> bool:
    if tensor.shape != weight.shape:
        return False
    return tensor is weight or torch.equal(tensor.detach().to(weight.dtype), weight.detach())


@dataclass
class MoEBlockView:
    """A sparse MoE block seen uniformly: router, rule, routed experts and any shared expert."""

    layer: int
    path: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    rule: Routing
    shared_expert: nn.Module | None
    shared_expert_gate: nn.Module | None
    router_args: tuple = ()  # what the block passes its router's forward beyond the hidden states

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
        """The router's logits ``[N, E]`` in float32, computed outside autocast."""
        return self.rule.logits(self.router, x)

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
        _, weights, indices = self.router(x, *self.router_args)
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
    named_args = _router_args(model, block, router)
    router_args = tuple(named_args.values())

    def view(rule: Routing) -> MoEBlockView:
        return MoEBlockView(
            layer=_layer_index(path),
            path=path,
            block=block,
            router=router,
            experts=experts,
            rule=rule,
            shared_expert=_first_attr(block, SHARED_EXPERT_NAMES),
            shared_expert_gate=_first_attr(block, SHARED_GATE_NAMES),
            router_args=router_args,
        )

    if router.weight.is_meta:  # nothing to run: the first candidate rule, unchecked
        return view(_candidate_rules(model, block, router)[0])
    # checked against the model's own computation in its precision, never a mixed one
    with torch.autocast(router.weight.device.type, enabled=False):
        checked = view(_infer_rule(model, block, router, named_args))
        _check_expert_layout(model, checked)
    return checked


def _router_args(model: nn.Module, block: nn.Module, router: nn.Module) -> dict:
    """What the block passes its router beyond the hidden states: each further argument of the
    router's forward without a default, taken from the block's attribute of that name."""
    parameters = list(inspect.signature(type(router).forward).parameters.values())[2:]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p.name for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty
    ]
    missing = [name for name in required if not hasattr(block, name)]
    if missing:
        raise FlexMoEError(
            f"router {type(router).__name__} of model type {_model_type(model)!r} routes by "
            f"{', '.join(missing)} as well as the hidden states, which flexmoe cannot score "
            "experts with"
        )
    return {name: getattr(block, name) for name in required}


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
        bias=getattr(router, BIAS, None),
    )
    norm = getattr(router, "norm_topk_prob", None)
    norms = (bool(norm),) if norm is not None else (True, False)
    return [
        replace(base, scoring=scoring, normalize=n)
        for scoring, n in itertools.product(("softmax", "sigmoid"), norms)
    ]


@torch.no_grad()
def _infer_rule(
    model: nn.Module, block: nn.Module, router: nn.Module, router_args: dict | None = None
) -> Routing:
    """The modelled rule that reproduces the router's forward, else the router run as written."""
    # checked in float32 on a copy of the (small) router: a bf16 router's near-ties would
    # otherwise make the right rule look wrong
    probe = copy.deepcopy(router).float().eval()
    named = {
        k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in (router_args or {}).items()
    }
    generator = torch.Generator().manual_seed(0)
    # a random score-correction bias (models build it as zeros), so that the check tells a rule
    # that uses it from one that does not
    bias = torch.randn(router.weight.shape[0], generator=generator).to(probe.weight.device)
    if BIAS in named:
        named[BIAS] = bias
    elif isinstance(getattr(probe, BIAS, None), torch.Tensor):
        getattr(probe, BIAS).copy_(bias)
    probe_bias = named.get(BIAS, getattr(probe, BIAS, None))
    args = tuple(named.values())
    x = torch.randn(64, router.weight.shape[-1], generator=generator).to(probe.weight.device)
    # the class's forward: a copy of a router that exact_routers wrapped would call the original
    logits, weights, indices = type(probe).forward(probe, x, *args)
    actual = torch.zeros(logits.shape, device=logits.device)
    actual = actual.scatter(-1, indices.long(), weights.float())
    try:
        candidates = _candidate_rules(model, block, probe)
    except FlexMoEError:  # no top-k to read: the router's own forward still tells it
        candidates = []
    for rule in candidates:
        if torch.allclose(
            replace(rule, bias=probe_bias).dense(logits), actual, atol=1e-5, rtol=1e-4
        ):
            return replace(rule, bias=(router_args or {}).get(BIAS, getattr(router, BIAS, None)))
    traced = RouterForward(int(indices.shape[-1]), probe, args)
    _check_router_forward(model, traced, x, actual)
    return RouterForward(traced.top_k, router, tuple((router_args or {}).values()))


def _check_router_forward(
    model: nn.Module, routing: RouterForward, x: torch.Tensor, actual: torch.Tensor
) -> None:
    """Refuse a router that ``RouterForward`` cannot drive: one whose weight flexmoe cannot find
    applied once, whose routing depends on more than those logits, or that ignores a mask."""
    name = f"router {type(routing.router).__name__} of model type {_model_type(model)!r}"
    with _RouterWeightOp(routing.router.weight) as op:
        type(routing.router).forward(routing.router, x, *routing.args)
    if op.seen != 1:
        raise FlexMoEError(
            f"{name} uses a routing rule flexmoe does not model, and its weight is not applied "
            "once by F.linear or a matmul, so its logits cannot be replaced inside it"
        )
    logits = routing.logits(routing.router, x)
    if not torch.allclose(routing.dense(logits), actual, atol=1e-5, rtol=1e-4):
        raise FlexMoEError(f"{name} routes by more than its logits; flexmoe cannot score it")
    generator = torch.Generator().manual_seed(2)
    allowed = (torch.rand(logits.shape, generator=generator) < 0.5).to(logits.device)
    allowed[torch.arange(len(allowed), device=logits.device), logits.argmin(dim=-1)] = True
    masked = routing.dense(logits, allowed)  # (every row allows one expert at least)
    if not masked.isfinite().all() or (masked[~allowed] != 0).any() or not masked.any(-1).all():
        raise FlexMoEError(f"{name} does not route within a masked set of experts")


@torch.no_grad()
def _check_expert_layout(model: nn.Module, view: MoEBlockView) -> None:
    if not isinstance(getattr(view.experts, "act_fn", None), nn.Module):
        raise FlexMoEError(
            f"experts module {type(view.experts).__name__} of model type {_model_type(model)!r} "
            "has no activation module 'act_fn' (it computes its gate some other way, such as a "
            "clamped SwiGLU); this expert layout is unsupported"
        )
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
