"""Local training: a few AdamW steps on the trainable (shared and personal) parameters."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.data import IGNORE_INDEX
from flexmoe.errors import FlexMoEError


def cosine_lr(round_: int, total_rounds: int, lr: float, min_lr: float) -> float:
    """Learning rate of ``round_`` (1-based), cosine-decayed from ``lr`` to ``min_lr``."""
    progress = (round_ - 1) / max(1, total_rounds - 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def answer_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's mean next-token loss over labelled tokens, projecting only where it counts.

    Equal to ``model(**batch).loss``; but answers are a few per cent of a padded instruction
    batch, and on a small model the vocabulary projection and its softmax over every position
    cost about half of a training step, so logits are made only at the positions (shared by the
    batch) that predict a labelled token.
    """
    targets = batch["labels"][:, 1:]
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
        logits_to_keep=positions,
    ).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, positions].flatten(), ignore_index=IGNORE_INDEX
    )


def train_steps(
    model: nn.Module,
    batches: Iterator[Mapping[str, torch.Tensor]],
    steps: int,
    lr: float,
    anchor: Mapping[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> list[float]:
    """Run ``steps`` optimizer steps; with ``anchor``, add FedProx's ``mu/2 ||w - w_global||^2``.

    Returns the task loss of every step.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if anchor is not None:
        unknown = sorted(set(anchor) - {n for n, _ in named})
        if unknown:
            raise FlexMoEError(
                f"the proximal anchor names {len(unknown)} parameters the model does not train, "
                f"e.g. {unknown[:2]}; give the anchor and the model with the same names"
            )
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = next(batches)
        loss = answer_loss(model, batch)
        total = loss + _proximal_term(named, anchor, proximal_mu) if anchor else loss
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _proximal_term(
    named: list[tuple[str, nn.Parameter]], anchor: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    squared = sum(((p - anchor[n]) ** 2).sum() for n, p in named if n in anchor)
    return 0.5 * mu * squared


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Mapping[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over ``batches`` (unlabelled positions are skipped)."""
    total, count = 0.0, 0
    for batch in batches:
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += answer_loss(model, batch).item() * tokens
        count += tokens
    return total / max(1, count)
