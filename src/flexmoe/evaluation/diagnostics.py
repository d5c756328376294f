"""What personalisation costs a client's model: knowledge, routing and compute, beside the base's.

Held-out perplexity per pretraining domain (and MMLU when asked), routing statistics on the
client's test data, MoE FLOPs per token, and which experts it grafted: the ``detail`` of a
client's final evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.cache import cache_dir
from flexmoe.evaluation.cost import flops_per_token
from flexmoe.evaluation.mmlu import MMLUQuestion, evaluate_mmlu, fetch_mmlu, load_mmlu
from flexmoe.evaluation.perplexity import domain_perplexities
from flexmoe.evaluation.routing import routing_statistics
from flexmoe.flex.model import FlexModel
from flexmoe.io import atomic_write_text, folder_lock
from flexmoe.models.loading import fingerprint as model_fingerprint
from flexmoe.models.loading import say
from flexmoe.results import (
    Diagnostics,
    FlopsPerToken,
    Knowledge,
    MMLUScore,
    Routing,
    RoutingStatistics,
    from_plain,
    to_plain,
)

HELDOUT_TOKENS = 2048  # per pretraining domain
DIGEST_SAMPLE = 1 << 16  # values per trained parameter that tell two clients' models apart
MEASURE_VERSION = 1  # of what the measures compute: bump to stop reading older cached values
MEASURE_FILE = "value.json"


@dataclass(frozen=True)
class BaseMeasures:
    """What a client's model is weighed against: its base's routing on the same batches, its
    held-out perplexity per domain, and its MMLU score when asked."""

    routing: RoutingStatistics
    heldout: dict[str, float]
    mmlu: MMLUScore | None = None


def measure_base(
    base: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batches: Sequence[Mapping[str, torch.Tensor]],
    mmlu_per_topic: int = 0,
) -> BaseMeasures:
    """``BaseMeasures`` of ``base``: a pristine base model, or a ``FlexModel`` computing as its
    base (``base_only``). Knowledge is kept in the flexmoe cache, for every later run."""
    cache, name = cache_dir() / "measures", base_fingerprint(base)
    mmlu = None
    if mmlu_per_topic:
        what = f"mmlu-{mmlu_per_topic}"
        mmlu = measured(cache, name, base, what, _mmlu, _mmlu_score, tokenizer, mmlu_per_topic)
    routing = f"routing-{batches_digest(batches)}"  # every cell scoring the same test examples
    return BaseMeasures(
        routing=measured(cache, name, base, routing, routing_statistics, _routing, batches),
        heldout=measured(cache, name, base, "heldout", _heldout, dict, tokenizer),
        mmlu=mmlu,
    )


def batches_digest(batches: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """A short hash of the token ids and masks of ``batches``."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask"):
            digest.update(batch[key].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _routing(plain: dict) -> RoutingStatistics:
    return from_plain(RoutingStatistics, plain, "a cached routing measure")


def diagnostics(
    model: FlexModel,
    base_name: str,
    tokenizer: PreTrainedTokenizerBase,
    batches: Sequence[Mapping[str, torch.Tensor]],
    measures: Path,
    base: BaseMeasures | None = None,
    mmlu_per_topic: int = 0,
    routing: RoutingStatistics | None = None,
) -> Diagnostics:
    """Knowledge, routing on ``batches`` and FLOPs of ``model``, each beside the base's.

    ``base`` is the base's measures, taken beforehand on a pristine base where training changed
    pretrained weights; without it they are taken on ``model`` with its adapters switched off.
    ``routing`` is ``model``'s on ``batches`` when a forward over them recorded it already.
    ``mmlu_per_topic`` > 0 adds MMLU 0-shot on the first that many scored questions of every
    topic. The trained model's knowledge is kept in ``measures`` (the run's), so that clients
    sharing one model measure it once.
    """
    if base is None:
        with model.base_only():
            base = measure_base(model, tokenizer, batches, mmlu_per_topic)
    flops = flops_per_token(model)
    mmlu = f"mmlu-{mmlu_per_topic}"
    trained = trained_digest(model, base_name)
    final_heldout = measured(measures, trained, model, "heldout", _heldout, dict, tokenizer)
    final_mmlu = mmlu_per_topic and measured(
        measures, trained, model, mmlu, _mmlu, _mmlu_score, tokenizer, mmlu_per_topic
    )
    return Diagnostics(
        knowledge=Knowledge(
            heldout_ppl=final_heldout,
            heldout_ppl_base=base.heldout,
            mmlu=final_mmlu or None,
            mmlu_base=base.mmlu,
        ),
        routing=Routing(base=base.routing, final=routing or routing_statistics(model, batches)),
        flops_per_token=FlopsPerToken(
            base=flops["base"], personalised=flops["personalised"], ratio=flops["ratio"]
        ),
        grafted_experts={str(g.layer): list(g.source_experts) for g in model.grafts},
        graft_losses={str(g.layer): list(g.losses) for g in model.grafts if g.losses},
    )


def measured(
    root: Path,
    name: str,
    model: nn.Module,
    what: str,
    measure: Callable,
    parse: Callable,
    *args: object,
) -> Any:
    """``measure(model, *args)`` of the weights ``name``, kept in ``root`` under ``name``, dtype
    and device and read back with ``parse``: every process with the same weights measures them
    once, and one that finds another measuring them waits for its value."""
    weight = next(model.parameters())
    device = weight.device.type
    mixed = torch.is_autocast_enabled(device) and f"-autocast-{torch.get_autocast_dtype(device)}"
    key = f"v{MEASURE_VERSION}-{name}-{weight.dtype}{mixed or ''}-{device}-{what}"
    folder = root / key.replace("torch.", "")
    value = _read_measure(folder, parse)  # values are written atomically: no lock to read one
    if value is not None:
        return value
    with folder_lock(folder, waiting=lambda holder: say(f"waiting for {holder} to {key}")):
        value = _read_measure(folder, parse)
        if value is None:
            value = measure(model, *args)
            atomic_write_text(folder / MEASURE_FILE, json.dumps(to_plain(value)))
    return value


def _read_measure(folder: Path, parse: Callable) -> Any | None:
    """The value kept in ``folder``, or None when there is none or it is damaged."""
    try:
        return parse(json.loads((folder / MEASURE_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def base_fingerprint(base: nn.Module) -> str:
    """The fingerprint of a base model, or of a FlexModel's base."""
    return base.base_fingerprint if isinstance(base, FlexModel) else model_fingerprint(base)


@torch.no_grad()
def trained_digest(model: FlexModel, base_name: str) -> str:
    """A name for ``model``'s weights: a hash of its base's name and fingerprint and of its
    trained parameters.

    A large parameter is hashed through a strided sample of its values (training moves all of
    them), so a method that trains every weight of a large model copies little to the host.
    """
    digest = hashlib.sha256(f"{base_name}:{model.base_fingerprint}".encode())
    for name, parameter in sorted(model.model.named_parameters()):
        if parameter.requires_grad:
            flat = parameter.detach().flatten()
            sample = flat[:: max(1, flat.numel() // DIGEST_SAMPLE)]
            digest.update(f"{name}:{flat.numel()}".encode())
            digest.update(sample.float().cpu().numpy().tobytes())
    return f"trained-{digest.hexdigest()}"


def _heldout(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    return domain_perplexities(model, tokenizer, HELDOUT_TOKENS)


def _mmlu_score(plain: dict) -> MMLUScore:
    return MMLUScore(**plain)


def _mmlu(model: nn.Module, tokenizer: PreTrainedTokenizerBase, per_topic: int) -> MMLUScore:
    scores = evaluate_mmlu(model, tokenizer, mmlu_questions(), shots=0, limit=per_topic)
    return MMLUScore(
        questions=scores["total"],
        accuracy=scores["accuracy"],
        macro_accuracy=scores["macro_accuracy"],
        correct_probability=scores["correct_probability"],
    )


@functools.cache
def mmlu_questions() -> tuple[MMLUQuestion, ...]:
    """The MMLU test set, read from the cache (fetched once), once per process."""
    return tuple(load_mmlu(fetch_mmlu()))
