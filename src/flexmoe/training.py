"""Local training: a few AdamW steps on the trainable (shared and personal) parameters."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.data import IGNORE_INDEX, on_model_device
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
    # the positions are found where the labels are (a host batch: no device sync)
    positions = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    batch = on_model_device(batch, model)
    targets = batch["labels"][:, 1:]
    positions = positions.to(targets.device, non_blocking=True)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
        logits_to_keep=positions,
    ).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets[:, positions].flatten(), ignore_index=IGNORE_INDEX
    )


def answer_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """How many tokens of ``batch`` its loss is taken on (the labelled ones)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_batches(batch: Mapping[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """A right-padded batch (``collate``'s) in parts of ``size`` examples (0: whole), the examples
    ordered by length and each part cut to its longest, so that parts pad little (1: not at all)."""
    if size == 0 or size >= len(batch["attention_mask"]):
        return [dict(batch)]
    lengths = batch["attention_mask"].sum(dim=1)
    parts = []
    for rows in lengths.argsort(stable=True).split(size):
        width = int(lengths[rows].max())
        parts.append({name: values[rows, :width] for name, values in batch.items()})
    return parts


def backward_in_parts(model: nn.Module, batch: Mapping[str, torch.Tensor], size: int) -> float:
    """Backpropagate ``batch``'s answer loss in micro-batches of ``size`` examples (0: at once).

    Each part's loss is weighted by its share of the batch's answer tokens, so the gradients that
    accumulate are the whole batch's (where the model draws no dropout); returns the whole
    batch's loss.
    """
    parts = [(part, answer_tokens(part)) for part in micro_batches(batch, size)]
    total = sum(tokens for _, tokens in parts)
    if total == 0:
        raise FlexMoEError(
            "a training batch has no answer tokens to learn from; give examples with answers "
            "that fit max-length"
        )
    weighted_losses = []
    for part, tokens in parts:
        if tokens:  # a part with no answer adds nothing (its mean loss would be 0/0)
            weighted = answer_loss(model, part) * (tokens / total)
            weighted.backward()
            weighted_losses.append(weighted.detach())
    return torch.stack(weighted_losses).sum().item()


def train_steps(
    model: nn.Module,
    batches: Iterator[Mapping[str, torch.Tensor]],
    steps: int,
    lr: float,
    anchor: Mapping[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
    gradient_checkpointing: bool = False,
    micro_batch_size: int = 0,
) -> list[float]:
    """Run ``steps`` optimizer steps; with ``anchor``, add FedProx's ``mu/2 ||w - w_global||^2``.

    ``gradient_checkpointing`` recomputes each decoder layer's activations in the backward pass
    (a transformers model's own checkpointing); ``micro_batch_size`` > 0 runs a batch's forward
    and backward passes that many examples at a time (``backward_in_parts``). Returns the task
    loss of every step.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if anchor is not None:
        unknown = sorted(set(anchor) - {n for n, _ in named})
        if unknown:
            raise FlexMoEError(
                f"the proximal anchor names {len(unknown)} parameters the model does not train, "
                f"e.g. {unknown[:2]}; give the anchor and the model with the same names"
            )
        anchor = {n: anchor[n].to(p) for n, p in named if n in anchor}  # once, not every step
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.0)
    losses = []
    with _training(model, gradient_checkpointing):
        for _ in range(steps):
            losses.append(backward_in_parts(model, next(batches), micro_batch_size))
            if anchor:
                _proximal_term(named, anchor, proximal_mu).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses


@contextlib.contextmanager
def _training(model: nn.Module, gradient_checkpointing: bool) -> Iterator[None]:
    """``model`` in training mode (and checkpointing, if asked) for the block, then back."""
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise FlexMoEError(
                f"{type(model).__name__} does not support gradient checkpointing; "
                "turn gradient-checkpointing off"
            )
        # non-reentrant: works with a frozen embedding, and with inputs that need no grad
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.eval()
        if gradient_checkpointing:
            model.activation_checkpointing_disable()


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
        tokens = answer_tokens(batch)
        total += answer_loss(model, batch).item() * tokens
        count += tokens
    return total / max(1, count)
