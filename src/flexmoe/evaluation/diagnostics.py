"""What personalisation costs a client's model: knowledge, routing and compute, beside the base's.

Held-out perplexity per pretraining domain, routing statistics on the client's test data, MoE
FLOPs per token, and which experts it grafted: the ``detail`` of a client's final evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.evaluation.cost import flops_per_token
from flexmoe.evaluation.perplexity import domain_perplexities
from flexmoe.evaluation.routing import routing_statistics
from flexmoe.loading import load_model
from flexmoe.model import FlexModel
from flexmoe.results import Diagnostics, FlopsPerToken, Knowledge, Routing

HELDOUT_TOKENS = 2048  # per pretraining domain


def diagnostics(
    model: FlexModel,
    base: nn.Module,
    base_name: str,
    tokenizer: PreTrainedTokenizerBase,
    batches: Sequence[Mapping[str, torch.Tensor]],
) -> Diagnostics:
    """Knowledge, routing on ``batches`` and FLOPs of ``model``, each beside ``base``'s."""
    flops = flops_per_token(model)
    return Diagnostics(
        knowledge=Knowledge(
            heldout_ppl=domain_perplexities(model, tokenizer, HELDOUT_TOKENS),
            heldout_ppl_base=base_heldout_perplexities(base_name),
        ),
        routing=Routing(
            base=routing_statistics(base, batches), final=routing_statistics(model, batches)
        ),
        flops_per_token=FlopsPerToken(
            base=flops["base"], personalised=flops["personalised"], ratio=flops["ratio"]
        ),
        grafted_experts={str(g.layer): list(g.source_experts) for g in model.grafts},
        graft_losses={str(g.layer): list(g.losses) for g in model.grafts if g.losses},
    )


@functools.lru_cache(maxsize=2)
def _base_heldout(model: str) -> tuple[tuple[str, float], ...]:
    base, tokenizer = load_model(model)
    return tuple(domain_perplexities(base, tokenizer, HELDOUT_TOKENS).items())


def base_heldout_perplexities(model: str) -> dict[str, float]:
    """The base model's held-out perplexity per domain, computed once per process."""
    return dict(_base_heldout(model))
