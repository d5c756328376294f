"""What personalisation costs a client's model: knowledge, routing and compute, beside the base's.

Held-out perplexity per pretraining domain, routing statistics on the client's test data, MoE
FLOPs per token, and which experts it grafted: the ``detail`` of a client's final evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.evaluation.cost import flops_per_token
from flexmoe.evaluation.perplexity import domain_perplexities
from flexmoe.evaluation.routing import routing_statistics
from flexmoe.model import FlexModel
from flexmoe.results import Diagnostics, FlopsPerToken, Knowledge, Routing

HELDOUT_TOKENS = 2048  # per pretraining domain


def diagnostics(
    model: FlexModel,
    base_name: str,
    tokenizer: PreTrainedTokenizerBase,
    batches: Sequence[Mapping[str, torch.Tensor]],
    base: nn.Module | None = None,
) -> Diagnostics:
    """Knowledge, routing on ``batches`` and FLOPs of ``model``, each beside the base's.

    The base is ``model`` with its adapters switched off, unless a pristine ``base`` is given
    (needed when training changed pretrained weights).
    """
    flops = flops_per_token(model)
    with _base_of(model, base) as reference:
        base_routing = routing_statistics(reference, batches)
        base_heldout = base_heldout_perplexities(base_name, reference, tokenizer)
    return Diagnostics(
        knowledge=Knowledge(
            heldout_ppl=domain_perplexities(model, tokenizer, HELDOUT_TOKENS),
            heldout_ppl_base=base_heldout,
        ),
        routing=Routing(base=base_routing, final=routing_statistics(model, batches)),
        flops_per_token=FlopsPerToken(
            base=flops["base"], personalised=flops["personalised"], ratio=flops["ratio"]
        ),
        grafted_experts={str(g.layer): list(g.source_experts) for g in model.grafts},
        graft_losses={str(g.layer): list(g.losses) for g in model.grafts if g.losses},
    )


@contextlib.contextmanager
def _base_of(model: FlexModel, base: nn.Module | None) -> Iterator[nn.Module]:
    """``base`` when given, else ``model`` computing as its base for the block."""
    if base is not None:
        yield base
        return
    with model.base_only():
        yield model


def base_heldout_perplexities(
    name: str, base: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> dict[str, float]:
    """The base model's held-out perplexity per domain, computed once per process and dtype."""
    key = (name, str(next(base.parameters()).dtype))
    if key not in _BASE_HELDOUT:
        _BASE_HELDOUT[key] = domain_perplexities(base, tokenizer, HELDOUT_TOKENS)
    return dict(_BASE_HELDOUT[key])


_BASE_HELDOUT: dict[tuple[str, str], dict[str, float]] = {}
