"""Prompt templates: the model's own chat template when it has one, else Alpaca.

An instruction-tuned model answers best in the format it was tuned with, so the template is a
property of the model, carried by its tokenizer (``tokenizer.chat_template``). A model without
one (a base model, the bundled ``tiny``) gets the Stanford Alpaca wording.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexmoe.data.records import InstructionExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def has_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    example: InstructionExample, tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    """The prompt the model sees, ending where the response begins; a blank input is omitted.

    With a tokenizer that has a chat template, the instruction (and input) is one user turn and
    the prompt ends with the assistant's cue; otherwise it is the Alpaca template.
    """
    if has_chat_template(tokenizer):
        turn = example.instruction
        if example.input.strip():
            turn = f"{turn}\n\n{example.input}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": turn}], tokenize=False, add_generation_prompt=True
        )
    if example.input.strip():
        return PROMPT_WITH_INPUT.format(instruction=example.instruction, input=example.input)
    return PROMPT_NO_INPUT.format(instruction=example.instruction)
