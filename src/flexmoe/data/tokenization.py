"""Tokenization, batching and collation for causal-LM instruction tuning."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from flexmoe.data.prompts import format_prompt, has_chat_template
from flexmoe.data.records import InstructionExample
from flexmoe.errors import FlexMoEError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that the causal-LM loss skips (prompt and padding positions)."""
SELECTION_TOKENS = ("all", "content", "answer")
"""What the grafting criterion may score: every token, the instruction, input and answer
without the prompt template, or the answer only."""

CONTEXT_CUT = " [...]"
"""What ends an input (a Dolly context) cut short to fit the maximum length."""

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """Token ids of prompt + response + eos, and labels with the prompt masked to IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]
    scored: list[int] | None = None  # 1 where the grafting criterion scores (None: everywhere)
    context_cut: bool = False  # the input was cut short to fit (CONTEXT_CUT marks where)
    answer_cut: bool = False  # the answer did not fit whole even so

    @property
    def num_target_tokens(self) -> int:
        """How many positions the loss is computed on."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_prompt(
    example: InstructionExample, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
) -> list[int]:
    """Prompt token ids for generation, at most ``max_length`` of them: the input is cut short
    first (``fit_context``); if the instruction alone is longer, its last tokens are kept."""
    if max_length is None:
        return _prompt_ids(example, tokenizer)
    _check_max_length(max_length)
    return _fitted_prompt(example, tokenizer, max_length)[1][-max_length:]


def fit_context(
    example: InstructionExample, tokenizer: PreTrainedTokenizerBase, room: int
) -> InstructionExample:
    """``example`` with its input cut short, so that its prompt takes at most ``room`` tokens.

    The input keeps its longest beginning that fits, ended at a word boundary and marked with
    ``CONTEXT_CUT``; instruction and answer stay whole. An example that fits already, or has
    no input, comes back as it is; one whose instruction alone is too long keeps the marker
    alone as its input.
    """
    return _fitted_prompt(example, tokenizer, room)[0]


def _fitted_prompt(
    example: InstructionExample, tokenizer: PreTrainedTokenizerBase, room: int
) -> tuple[InstructionExample, list[int]]:
    """``fit_context``'s example, and its prompt's token ids."""
    ids = _prompt_ids(example, tokenizer)
    if not example.input.strip() or len(ids) <= room:
        return example, ids
    fitted = _cut(example, 0)
    ids = _prompt_ids(fitted, tokenizer)
    fits, fails = 0, len(example.input)  # the longest fitting prefix length lies in [fits, fails)
    while fails - fits > 1:
        middle = (fits + fails) // 2
        candidate = _cut(example, middle)
        candidate_ids = _prompt_ids(candidate, tokenizer)
        if len(candidate_ids) <= room:
            fits, fitted, ids = middle, candidate, candidate_ids
        else:
            fails = middle
    return fitted, ids


def _cut(example: InstructionExample, length: int) -> InstructionExample:
    """``example`` with its input's first ``length`` characters, back to a word boundary."""
    kept = example.input[:length]
    if length < len(example.input) and not example.input[length].isspace():
        words = kept.rsplit(None, 1)
        kept = words[0] if len(words) == 2 else kept
    return replace(example, input=(kept.rstrip() + CONTEXT_CUT).strip())


def encode_prompts(prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of prompts made by ``format_prompt``; a chat template writes its own special
    tokens, so the tokenizer adds none to it."""
    special = not has_chat_template(tokenizer)
    return tokenizer(list(prompts), add_special_tokens=special)["input_ids"]


def _prompt_ids(example: InstructionExample, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return encode_prompts([format_prompt(example, tokenizer)], tokenizer)[0]


def tokenize_example(
    example: InstructionExample,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    terminate: bool = True,
    selection_tokens: str = "all",
) -> TokenizedExample:
    """Tokenize prompt and response separately (so masking is exact), append eos, and fit it
    all in ``max_length`` tokens: the input is cut short first (``fit_context``), and only
    when instruction and answer alone are too long is the answer truncated.

    ``terminate=False`` leaves out the eos, for scoring text with tokenizers that have none.
    ``selection_tokens`` marks the tokens the grafting criterion scores (``SELECTION_TOKENS``):
    ``content`` marks the instruction, input and answer, which differ between clients, and
    leaves out the template around them (chat markup or Alpaca wording, and the eos) that every
    example shares; ``answer`` marks the answer alone.
    """
    _check_max_length(max_length)
    if selection_tokens not in SELECTION_TOKENS:
        raise FlexMoEError(
            f"unknown selection tokens {selection_tokens!r}; choose one of {SELECTION_TOKENS}"
        )
    response = tokenizer.encode(example.output, add_special_tokens=False)
    fitted, prompt = _fitted_prompt(example, tokenizer, max_length - len(response) - terminate)
    if selection_tokens == "content":
        prompt, in_prompt = _prompt_with_content(fitted, tokenizer)
    else:
        in_prompt = [0] * len(prompt)
    marks = None if selection_tokens == "all" else in_prompt + [1] * len(response)
    if terminate:
        response.append(eos_token_id(tokenizer))
    input_ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    if marks is not None:
        marks = (marks + [0] * terminate)[:max_length]
    return TokenizedExample(
        input_ids=input_ids,
        labels=labels,
        scored=marks,
        context_cut=fitted is not example,
        answer_cut=len(prompt) + len(response) > max_length,
    )


def _prompt_with_content(
    example: InstructionExample, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """The prompt's token ids (as ``_prompt_ids`` makes them), and 1 for each that overlaps the
    instruction or the input text, else 0."""
    if not getattr(tokenizer, "is_fast", False):
        raise FlexMoEError(
            "selection-tokens=content needs a fast tokenizer (one with offset mappings); "
            "use selection-tokens=answer or all"
        )
    prompt = format_prompt(example, tokenizer)
    spans, start = [], 0
    for text in (example.instruction, example.input):
        at = prompt.find(text, start) if text.strip() else -1
        if at >= 0:
            spans.append((at, at + len(text)))
            start = at + len(text)
    encoded = tokenizer(
        prompt,
        add_special_tokens=not has_chat_template(tokenizer),
        return_offsets_mapping=True,
    )
    marks = [
        int(any(a < end and b > begin for begin, end in spans))
        for a, b in encoded["offset_mapping"]
    ]
    return encoded["input_ids"], marks


def tokenize_examples(
    examples: Sequence[InstructionExample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    terminate: bool = True,
    selection_tokens: str = "all",
) -> list[TokenizedExample]:
    """Tokenize all examples, dropping those whose prompt alone fills `max_length`."""
    tokenized = [
        tokenize_example(e, tokenizer, max_length, terminate, selection_tokens) for e in examples
    ]
    kept = [example for example in tokenized if example.num_target_tokens > 0]
    if examples and not kept:
        raise FlexMoEError(
            f"every prompt is at least max_length={max_length} tokens long, leaving no response "
            "tokens to train on; increase the maximum sequence length"
        )
    if len(kept) < len(tokenized):
        logger.warning(
            "dropped %d of %d examples whose prompt fills max_length=%d",
            len(tokenized) - len(kept),
            len(tokenized),
            max_length,
        )
    return kept


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's eos id, or a FlexMoEError if it has none."""
    if tokenizer.eos_token_id is None:
        raise FlexMoEError(
            "the tokenizer has no eos token, so responses cannot be terminated; "
            "set tokenizer.eos_token (e.g. to the model's end-of-text token)"
        )
    return tokenizer.eos_token_id


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, else eos, else 0: padded positions are masked, so any id serves."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch: input_ids, attention_mask and labels (padding is ignored)."""
    if not batch:
        raise FlexMoEError("cannot collate an empty batch; use a batch size of at least 1")
    input_ids = _pad([example.input_ids for example in batch], pad_id, left=False)
    labels = _pad([example.labels for example in batch], IGNORE_INDEX, left=False)
    mask = _pad([[1] * len(example.input_ids) for example in batch], 0, left=False)
    collated = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if any(example.scored is not None for example in batch):
        scored = [example.scored or [1] * len(example.input_ids) for example in batch]
        collated["scored_mask"] = _pad(scored, 0, left=False)
    return collated


def on_model_device(
    batch: Mapping[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """``batch`` on the device of ``model``'s weights (tensors are made on the host)."""
    device = next(model.parameters()).device
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompt ids for batched generation: input_ids and attention_mask."""
    if not prompts:
        raise FlexMoEError("cannot collate an empty batch of prompts; pass at least one")
    return {
        "input_ids": _pad(prompts, pad_id, left=True),
        "attention_mask": _pad([[1] * len(ids) for ids in prompts], 0, left=True),
    }


def sequential_batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Collated batches covering `examples` once, in order (for scoring and evaluation)."""
    if batch_size < 1:
        raise FlexMoEError(f"batch size must be at least 1, got {batch_size}")
    return [
        collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)
    ]


def iterate_batches(
    items: Sequence[T], batch_size: int, seed: int, start_step: int = 0
) -> Iterator[list[T]]:
    """Yield fixed-size batches forever, cycling through `items` in a fresh order each pass.

    The order of pass e is a permutation drawn from (seed, e), so batch k depends only on the seed
    and k: a client can resume at `start_step` without replaying earlier batches.
    """
    if not items:
        raise FlexMoEError("no examples to draw batches from; give every client some training data")
    if batch_size < 1:
        raise FlexMoEError(f"batch size must be at least 1, got {batch_size}")
    if seed < 0 or start_step < 0:
        raise FlexMoEError(f"seed and start step must be >= 0, got {seed} and {start_step}")
    return _batches(items, batch_size, seed, start_step)


def _batches(items: Sequence[T], batch_size: int, seed: int, start_step: int) -> Iterator[list[T]]:
    epoch, offset = divmod(start_step * batch_size, len(items))
    order = _pass_order(len(items), seed, epoch)
    while True:
        batch: list[T] = []
        while len(batch) < batch_size:
            take = min(batch_size - len(batch), len(items) - offset)
            batch.extend(items[i] for i in order[offset : offset + take])
            offset += take
            if offset == len(items):
                epoch, offset = epoch + 1, 0
                order = _pass_order(len(items), seed, epoch)
        yield batch


def _pass_order(size: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def _pad(rows: Sequence[Sequence[int]], value: int, *, left: bool) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            target = out[i, width - len(row) :] if left else out[i, : len(row)]
            target.copy_(torch.as_tensor(row, dtype=torch.long))
    return out


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise FlexMoEError(
            f"maximum sequence length must be at least 2 tokens, got {max_length}; raise it"
        )
