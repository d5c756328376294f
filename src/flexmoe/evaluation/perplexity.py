"""Held-out perplexity per pretraining domain: how much general language a client keeps.

The held-out texts ship in ``flexmoe/assets/heldout/<domain>.txt``. A text is tokenized without
special tokens and cut into non-overlapping windows of ``seq_len`` tokens; each window predicts all
its tokens but the first, and perplexity is ``exp`` of the token-weighted mean negative
log-likelihood over all windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.data import IGNORE_INDEX, TokenizedExample, collate, heldout_texts, pad_token_id
from flexmoe.errors import FlexMoEError


@torch.no_grad()
def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    seq_len: int = 256,
    batch_size: int = 8,
    pad_id: int = 0,
) -> tuple[float, int]:
    """``(summed NLL, tokens predicted)`` of a 1-D token sequence, in non-overlapping windows."""
    if seq_len < 2:
        raise FlexMoEError(f"the window length must be at least 2 tokens, got {seq_len}")
    windows = [w.tolist() for w in input_ids.split(seq_len) if len(w) > 1]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        batch = collate([TokenizedExample(w, w) for w in chunk], pad_id)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch, use_cache=False).logits[:, :-1]
        total += F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total, count


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> float:
    """Perplexity of ``text`` (its first ``max_tokens`` tokens, if given)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    total, count = token_nll(
        model, torch.tensor(ids, dtype=torch.long), seq_len, batch_size, pad_token_id(tokenizer)
    )
    if count == 0:
        raise FlexMoEError(
            "the text is too short to measure perplexity: it needs at least 2 tokens"
        )
    return math.exp(total / count)


def domain_perplexities(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int | None = 4096,
    seq_len: int = 256,
    batch_size: int = 8,
) -> dict[str, float]:
    """Perplexity on each packaged held-out domain (the first ``max_tokens`` tokens of each)."""
    return {
        domain: perplexity(model, tokenizer, text, seq_len, max_tokens, batch_size)
        for domain, text in heldout_texts().items()
    }
