"""Packaged plain text: held-out samples for perplexity, calibration samples for carving.

Both come from the same seven domains (``scripts/corpus.py``) but from disjoint documents: the
calibration text is drawn from the train split only (``scripts/calibration_text.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.errors import FlexMoEError

Batch = dict[str, torch.Tensor]


def packaged_texts(folder: str) -> dict[str, str]:
    """Every ``assets/<folder>/<domain>.txt`` shipped with flexmoe, by domain name, sorted."""
    root = resources.files("flexmoe").joinpath("assets", folder)
    texts = {
        entry.name.removesuffix(".txt"): entry.read_text(encoding="utf-8")
        for entry in root.iterdir()
        if entry.name.endswith(".txt")
    }
    if not texts:
        raise FlexMoEError(f"no texts in flexmoe/assets/{folder}; reinstall flexmoe")
    return dict(sorted(texts.items()))


def heldout_texts() -> dict[str, str]:
    """The held-out text of every domain, for perplexity; never trained or calibrated on."""
    return packaged_texts("heldout")


def calibration_texts() -> dict[str, str]:
    """Generic text of every domain for calibrating a carving, from train documents only."""
    return packaged_texts("calibration")


def text_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    seq_len: int,
    batch_size: int,
    count: int | None = None,
) -> list[Batch]:
    """Full batches of ``seq_len``-token windows cut from ``texts`` joined: ``count`` of them,
    or as many as the texts fill when ``count`` is None."""
    ids = [i for text in texts for i in tokenizer.encode(text, add_special_tokens=False)]
    available = len(ids) // (batch_size * seq_len)
    if count is None:
        count = available
    if not available or not 1 <= count <= available:
        raise FlexMoEError(
            f"the texts give {len(ids)} tokens, which fill {available} batches of {batch_size} "
            f"x {seq_len} tokens, not {count or 1}; give more text or ask for fewer batches"
        )
    windows = torch.tensor(ids[: count * batch_size * seq_len]).view(count, batch_size, seq_len)
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
