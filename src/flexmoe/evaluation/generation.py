"""Answers by generation (greedy, or sampled), and their ROUGE-L F1 (rouge-score, stemming)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer
from torch import nn
from tqdm.auto import tqdm
from transformers import TextStreamer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.data import (
    InstructionExample,
    collate_prompts,
    encode_prompt,
    eos_token_id,
    on_model_device,
    pad_token_id,
)
from flexmoe.errors import FlexMoEError


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded: greedy at temperature 0 (the default), else sampled."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FlexMoEError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise FlexMoEError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FlexMoEError(f"top-p must be in (0, 1], got {self.top_p}")

    def options(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        """``model.generate``'s arguments."""
        # top_k 0: nucleus sampling alone, not transformers' default top-50 on top of it
        sampled = {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.temperature > 0,
            **(sampled if self.temperature > 0 else {}),
            "pad_token_id": pad_token_id(tokenizer),
            "eos_token_id": eos_token_id(tokenizer),
        }


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[InstructionExample],
    max_new_tokens: int | Decoding,
    max_prompt_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Answers to each example's prompt (greedy unless a ``Decoding`` says otherwise), decoded
    without special tokens.

    Prompts are batched by length (shortest first), so that a batch pads little; a batch stops
    when all its answers have reached the end-of-sequence token.
    """
    decoding = max_new_tokens if isinstance(max_new_tokens, Decoding) else Decoding(max_new_tokens)
    model.eval()
    prompts = [encode_prompt(e, tokenizer, max_prompt_tokens) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="answering", unit="batch", disable=not progress):
        indices = order[start : start + batch_size]
        batch = collate_prompts([prompts[i] for i in indices], pad_token_id(tokenizer))
        batch = on_model_device(batch, model)
        output = model.generate(**batch, **decoding.options(tokenizer))
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        answers.update(zip(indices, decoded, strict=True))
    return [answers[i].strip() for i in range(len(prompts))]


@torch.no_grad()
def stream_answer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    example: InstructionExample,
    decoding: Decoding,
    max_prompt_tokens: int,
) -> str:
    """The answer to one prompt, printed to stdout token by token as it is generated."""
    model.eval()
    prompt = collate_prompts([encode_prompt(example, tokenizer, max_prompt_tokens)], 0)
    prompt = on_model_device(prompt, model)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    output = model.generate(**prompt, **decoding.options(tokenizer), streamer=streamer)
    new_tokens = output[0, prompt["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference, in [0, 1]."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]
