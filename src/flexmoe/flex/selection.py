"""Which pretrained experts to graft: the reconstruction criterion of Lu et al. (ACL 2024).

For a set S of experts the block is re-run as if routing could use S alone (every other router
logit at -inf, the block's own top-k and weighting re-applied) and compared with its real output:
``L(S) = sum over batches of ||Z - Z_S||_F``. Only the routed part of a block depends on the
router, so ``Z - Z_S = R - sum_e W_S[:, e] * E_e(X)``, with ``R`` the block's real routed output
and ``E_e`` expert e's output. One model forward per batch; each block scores every candidate
from its input as the forward reaches it, never by a forward per candidate.
A batch's ``scored_mask``, when it has one, limits the sum to those tokens (the forward still
sees every token of the attention mask). Scoring costs about E/k times the routed experts'
compute of a forward per scored token, so a token budget bounds it: a uniform, seeded draw of
that many of the scored tokens, the same in every layer (each batch's norm is then taken over
its drawn tokens; benchmarks/perf/perf.py's ``budget`` section measures how often that picks the
expert that every token picks).
Tokens are scored in chunks, so memory does not grow with the batch.

Strategies for r experts per layer:

- ``top`` (default): the r experts with the lowest single-expert loss ``L({e})``: the paper's
  criterion applied expert by expert; one pass over the data.
- ``greedy``: grow S one expert at a time, adding the expert that minimises ``L(S)``; r passes.
- ``exhaustive``: the r-subset with the lowest ``L(S)``; one pass, refused beyond
  ``MAX_EXHAUSTIVE_SETS`` subsets.
- ``random``: r experts drawn uniformly from ``seed`` (the random-expert ablation); losses are
  still scored and reported.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from flexmoe.data import on_model_device
from flexmoe.errors import FlexMoEError
from flexmoe.flex.config import SELECTION_STRATEGIES
from flexmoe.flex.moe import MoEBlockView

MAX_EXHAUSTIVE_SETS = 5000
MAX_MIXED_ELEMENTS = 2**25  # bounds the [sets, tokens, hidden] tensor scored at once

Batch = Mapping[str, torch.Tensor]


@dataclass
class LayerChoice:
    """The outcome of selection for one MoE layer."""

    layer: int
    losses: list[float]  # L({e}) for every candidate expert e
    chosen: list[int]
    set_loss: float | None  # L(chosen); not computed by 'top' for r > 1
    importance: torch.Tensor  # [r, I] mean |intermediate activation| of the chosen experts

    def to_report(self) -> dict:
        return {
            "layer": self.layer,
            "losses": self.losses,
            "chosen": self.chosen,
            "set_loss": self.set_loss,
        }


@dataclass
class _LayerScores:
    set_losses: torch.Tensor  # [S] float64
    activation_sum: torch.Tensor  # [E, I]
    tokens: int = 0


def select_experts(
    model: nn.Module,
    views: Sequence[MoEBlockView],
    batches: Sequence[Batch],
    experts_per_layer: int = 1,
    strategy: str = "top",
    progress: bool = False,
    seed: int = 0,
    token_budget: int = 0,
) -> list[LayerChoice]:
    """Choose ``experts_per_layer`` experts to graft in every MoE layer from local ``batches``,
    scoring ``token_budget`` of their tokens per layer (0: all), drawn with ``seed``."""
    _validate(views, batches, experts_per_layer, strategy)
    r = experts_per_layer
    first = {v.layer: _first_sets(v.num_experts, r, strategy) for v in views}
    sample = {"token_budget": token_budget, "seed": seed}
    scores = score_sets(model, views, batches, first, progress, **sample)
    choices = {}
    for v in views:
        losses = scores[v.layer].set_losses
        if strategy == "exhaustive" and r > 1:
            best = int(losses[v.num_experts :].argmin()) + v.num_experts
            choices[v.layer] = (_members(first[v.layer][best]), float(losses[best]))
        else:
            order = losses[: v.num_experts].argsort()[:r].tolist()
            choices[v.layer] = (order, float(losses[order[0]]) if r == 1 else None)
    if strategy == "greedy":
        choices = _greedy(model, views, batches, choices, r, progress, sample)
    if strategy == "random":
        generator = torch.Generator().manual_seed(seed)
        choices = {
            v.layer: (sorted(torch.randperm(v.num_experts, generator=generator)[:r].tolist()), None)
            for v in views
        }
    return [_layer_choice(v, scores[v.layer], *choices[v.layer]) for v in views]


@torch.no_grad()
def score_sets(
    model: nn.Module,
    views: Sequence[MoEBlockView],
    batches: Sequence[Batch],
    allowed: Mapping[int, torch.Tensor],
    progress: bool = False,
    token_budget: int = 0,
    seed: int = 0,
) -> dict[int, _LayerScores]:
    """``L(S)`` for every row ``S`` of the boolean ``allowed[layer]`` masks ``[S, E]``, over
    ``token_budget`` of the scored tokens drawn uniformly with ``seed`` (0: every one)."""
    scores = {
        v.layer: _LayerScores(
            torch.zeros(len(allowed[v.layer]), dtype=torch.float64),
            torch.zeros(v.num_experts, v.intermediate_size, device=v.experts.down_proj.device),
        )
        for v in views
    }
    masks = scored_token_masks(batches, token_budget, seed)
    was_training = model.training
    model.eval()

    def accumulate(view: MoEBlockView, tokens: torch.Tensor) -> None:
        _accumulate(view, tokens, allowed[view.layer], scores[view.layer])

    with visit_block_inputs(views, accumulate) as scored:
        for batch, mask in tqdm(
            list(zip(batches, masks, strict=True)),
            desc="scoring experts",
            disable=not progress,
            leave=False,
        ):
            if not mask.any():
                continue  # no token of it is scored: its forward would change nothing
            batch = on_model_device(batch, model)
            scored["mask"] = mask.to(batch["input_ids"].device).flatten()
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
                logits_to_keep=1,  # only the MoE blocks' inputs are needed, not the vocabulary
            )
    model.train(was_training)
    return scores


def scored_token_masks(batches: Sequence[Batch], budget: int, seed: int) -> list[torch.Tensor]:
    """Per batch, the tokens the criterion scores: those its ``scored_mask`` (else its attention
    mask) marks, or ``budget`` of them drawn uniformly over all batches when there are more."""
    masks = [
        batch.get("scored_mask", batch["attention_mask"]).to("cpu", torch.bool, copy=True)
        for batch in batches
    ]  # copies: the draw writes into them
    counts = [int(m.sum()) for m in masks]
    total = sum(counts)
    if not budget or total <= budget:
        return masks
    drawn = torch.zeros(total, dtype=torch.bool)
    drawn[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:budget]] = True
    for mask, kept in zip(masks, drawn.split(counts), strict=True):
        mask[mask.clone()] = kept
    return masks


@contextlib.contextmanager
def visit_block_inputs(
    views: Sequence[MoEBlockView], visit: Callable[[MoEBlockView, torch.Tensor], None]
) -> Iterator[dict[str, torch.Tensor]]:
    """Call ``visit(view, tokens [N, H])`` with each block's input as the forward reaches it
    (one layer's tokens held at a time), on the tokens of the yielded ``["mask"]`` (flat over
    the batch; set it before each forward)."""
    scored: dict[str, torch.Tensor] = {}

    def hook_for(view: MoEBlockView):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            visit(view, hidden.reshape(-1, view.hidden_size)[scored["mask"]])

        return hook

    handles = [v.block.register_forward_pre_hook(hook_for(v), with_kwargs=True) for v in views]
    try:
        yield scored
    finally:
        for handle in handles:
            handle.remove()


def _accumulate(
    view: MoEBlockView, x: torch.Tensor, allowed: torch.Tensor, scores: _LayerScores
) -> None:
    """Add one batch's ``||Z - Z_S||_F`` for every set ``S``, over chunks of tokens so that
    memory does not grow with the batch."""
    squares = torch.zeros(len(allowed), dtype=torch.float64)
    for tokens in x.split(_token_chunk(view)):
        activations = view.expert_activations(tokens)
        # summed in float64 on the host (MPS has no float64): one small copy per chunk
        squares += token_errors(view, tokens, allowed, activations).sum(dim=1).cpu().double()
        scores.activation_sum += activations.abs().sum(dim=1).float()
    scores.set_losses += squares.sqrt()
    scores.tokens += len(x)


def token_errors(
    view: MoEBlockView,
    x: torch.Tensor,
    allowed: torch.Tensor,
    activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||z - z_S||^2`` on each token of ``x [N, H]`` for every row ``S`` of ``allowed [S, E]``:
    ``[S, N]`` in float32 (``activations``: ``view.expert_activations(x)``, if already made)."""
    if activations is None:
        activations = view.expert_activations(x)
    routed = view.routed_output(x).float()
    outputs = view.expert_outputs(activations).float()
    logits = view.router_logits(x)
    allowed = allowed.to(logits.device)
    errors = []
    for sets in allowed.split(max(1, MAX_MIXED_ELEMENTS // max(1, routed.numel()))):
        weights = view.rule.dense(logits.expand(len(sets), *logits.shape), sets[:, None, :])
        mixed = torch.einsum("sne,enh->snh", weights, outputs)
        errors.append((routed - mixed).square().sum(dim=-1))
    return torch.cat(errors)


def _token_chunk(view: MoEBlockView) -> int:
    """Tokens scored at once: every expert's activations ``[E, n, I]`` and outputs ``[E, n, H]``
    within ``MAX_MIXED_ELEMENTS``."""
    per_token = view.num_experts * (view.intermediate_size + view.hidden_size)
    return max(1, MAX_MIXED_ELEMENTS // per_token)


def _validate(
    views: Sequence[MoEBlockView], batches: Sequence[Batch], r: int, strategy: str
) -> None:
    if strategy not in SELECTION_STRATEGIES:
        raise FlexMoEError(
            f"unknown selection strategy {strategy!r}; choose one of {SELECTION_STRATEGIES}"
        )
    if not batches:
        raise FlexMoEError("no local data to select experts from: the data set is empty")
    num_experts = min(v.num_experts for v in views)
    if not 1 <= r <= num_experts:
        raise FlexMoEError(f"experts per layer must be between 1 and {num_experts}, got {r}")
    if strategy == "exhaustive" and math.comb(num_experts, r) > MAX_EXHAUSTIVE_SETS:
        raise FlexMoEError(
            f"exhaustive selection of {r} of {num_experts} experts would score "
            f"{math.comb(num_experts, r)} sets (limit {MAX_EXHAUSTIVE_SETS}); use 'greedy'"
        )


def _first_sets(num_experts: int, r: int, strategy: str) -> torch.Tensor:
    """Singletons, followed by every r-subset when the search is exhaustive."""
    singles = torch.eye(num_experts, dtype=torch.bool)
    if strategy != "exhaustive" or r == 1:
        return singles
    subsets = torch.zeros(math.comb(num_experts, r), num_experts, dtype=torch.bool)
    for row, members in enumerate(itertools.combinations(range(num_experts), r)):
        subsets[row, list(members)] = True
    return torch.cat([singles, subsets])


def _members(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def _greedy(
    model: nn.Module,
    views: Sequence[MoEBlockView],
    batches: Sequence[Batch],
    choices: dict[int, tuple[list[int], float | None]],
    r: int,
    progress: bool,
    sample: Mapping[str, int],
) -> dict[int, tuple[list[int], float | None]]:
    chosen = {layer: members[:1] for layer, (members, _) in choices.items()}
    set_loss = {layer: loss for layer, (_, loss) in choices.items()}
    for _ in range(1, r):
        grown = {v.layer: _grow(v.num_experts, chosen[v.layer]) for v in views}
        scores = score_sets(model, views, batches, grown, progress, **sample)
        for v in views:
            losses = scores[v.layer].set_losses
            best = int(losses.argmin())
            chosen[v.layer] = _members(grown[v.layer][best])
            set_loss[v.layer] = float(losses[best])
    return {layer: (chosen[layer], set_loss[layer]) for layer in chosen}


def _grow(num_experts: int, members: list[int]) -> torch.Tensor:
    """Every set made of ``members`` plus one expert not yet in it."""
    rest = [e for e in range(num_experts) if e not in members]
    sets = torch.zeros(len(rest), num_experts, dtype=torch.bool)
    sets[:, members] = True
    sets[torch.arange(len(rest)), rest] = True
    return sets


def _layer_choice(
    view: MoEBlockView, scores: _LayerScores, chosen: list[int], set_loss: float | None
) -> LayerChoice:
    return LayerChoice(
        layer=view.layer,
        losses=scores.set_losses[: view.num_experts].tolist(),
        chosen=chosen,
        set_loss=set_loss,
        importance=scores.activation_sum[chosen].cpu() / max(1, scores.tokens),
    )
