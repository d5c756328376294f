"""What personalisation costs a client's model: knowledge, routing and compute, beside the base's.

Held-out perplexity per pretraining domain, routing statistics on the client's test data, MoE
FLOPs per token, and which experts it grafted: the ``detail`` of a client's final evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.evaluation.cost import flops_per_token
from flexmoe.evaluation.perplexity import domain_perplexities
from flexmoe.evaluation.routing import routing_statistics
from flexmoe.hardware import Placement
from flexmoe.loading import load_model, load_tokenizer
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
    if base is None:
        with model.base_only():
            base_routing = routing_statistics(model, batches)
    else:
        base_routing = routing_statistics(base, batches)
    return Diagnostics(
        knowledge=Knowledge(
            heldout_ppl=domain_perplexities(model, tokenizer, HELDOUT_TOKENS),
            heldout_ppl_base=base_heldout_perplexities(base_name, model),
        ),
        routing=Routing(base=base_routing, final=routing_statistics(model, batches)),
        flops_per_token=FlopsPerToken(
            base=flops["base"], personalised=flops["personalised"], ratio=flops["ratio"]
        ),
        grafted_experts={str(g.layer): list(g.source_experts) for g in model.grafts},
        graft_losses={str(g.layer): list(g.losses) for g in model.grafts if g.losses},
    )


def base_heldout_perplexities(name: str, model: FlexModel) -> dict[str, float]:
    """The base model's held-out perplexity per domain, computed once per process.

    It is computed with ``model``'s adapters switched off, or on a freshly loaded base when
    ``model`` trained pretrained weights.
    """
    weight = next(model.parameters())
    key = (name, str(weight.dtype))
    if key not in _BASE_HELDOUT:
        if model.config.shared.trains_base_weights:
            base, tokenizer = load_model(name, Placement(weight.device, weight.dtype))
            _BASE_HELDOUT[key] = domain_perplexities(base, tokenizer, HELDOUT_TOKENS)
        else:
            with model.base_only():
                perplexities = domain_perplexities(model, load_tokenizer(name), HELDOUT_TOKENS)
            _BASE_HELDOUT[key] = perplexities
    return dict(_BASE_HELDOUT[key])


_BASE_HELDOUT: dict[tuple[str, str], dict[str, float]] = {}
