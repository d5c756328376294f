"""Evaluation by generation: greedy answers scored with ROUGE-L F1 (rouge-score, stemming)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rouge_score import rouge_scorer
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.data import (
    InstructionExample,
    collate_prompts,
    encode_prompt,
    eos_token_id,
    on_model_device,
    pad_token_id,
)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[InstructionExample],
    max_new_tokens: int,
    max_prompt_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to each example's prompt, decoded without special tokens.

    Prompts are batched by length (shortest first), so that a batch pads little; a batch stops
    when all its answers have reached the end-of-sequence token.
    """
    model.eval()
    prompts = [encode_prompt(e, tokenizer, max_prompt_tokens) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate_prompts([prompts[i] for i in indices], pad_token_id(tokenizer))
        batch = on_model_device(batch, model)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id(tokenizer),
            eos_token_id=eos_token_id(tokenizer),
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        answers.update(zip(indices, decoded, strict=True))
    return [answers[i].strip() for i in range(len(prompts))]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference, in [0, 1]."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]
