"""Alpaca and chat templates, prompt masking, truncation, collation and seeded batching."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from flexmoe.data import (
    CONTEXT_CUT,
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    InstructionExample,
    TokenizedExample,
    collate,
    collate_prompts,
    encode_prompt,
    fit_context,
    format_prompt,
    iterate_batches,
    pad_token_id,
    tokenize_example,
    tokenize_examples,
)
from flexmoe.errors import FlexMoEError

WITH_INPUT = InstructionExample("Translate to French.", "Good morning", "Bonjour", "translation")
NO_INPUT = InstructionExample("Name a primary colour.", "", "Red is one.", "open_qa")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained here on the template text (no downloads)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [format_prompt(WITH_INPUT), format_prompt(NO_INPUT), "Bonjour Red is one."] * 20
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


def test_template_with_and_without_input():
    assert format_prompt(WITH_INPUT) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n"
    )
    assert format_prompt(NO_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a primary colour.\n\n### Response:\n"
    )


def test_blank_input_uses_the_no_input_template_and_braces_survive():
    example = InstructionExample("Print {x}.", "  \n", "ok")
    assert format_prompt(example) == PROMPT_NO_INPUT.format(instruction="Print {x}.")


@pytest.mark.parametrize("example", [WITH_INPUT, NO_INPUT])
def test_prompt_is_masked_and_response_plus_eos_is_supervised(tokenizer, example):
    tokenized = tokenize_example(example, tokenizer, max_length=512)
    prompt = tokenizer.encode(format_prompt(example))
    response = tokenizer.encode(example.output, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    assert tokenized.input_ids == prompt + response + [eos]
    assert tokenized.labels == [IGNORE_INDEX] * len(prompt) + response + [eos]
    assert tokenizer.decode(tokenized.input_ids[: len(prompt)]) == format_prompt(example)
    supervised = [t for t in tokenized.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == example.output + "<eos>"
    assert tokenized.num_target_tokens == len(response) + 1


def test_a_long_input_is_cut_at_a_word_and_marked_and_instruction_and_answer_stay_whole(
    tokenizer,
):
    long = InstructionExample("Translate to French.", "Good morning " * 40, "Bonjour", "t")
    whole = tokenize_example(long, tokenizer, max_length=2048)
    limit = len(whole.input_ids) // 2
    cut = tokenize_example(long, tokenizer, max_length=limit)
    assert cut.context_cut and not cut.answer_cut and not whole.context_cut
    assert len(cut.input_ids) <= limit
    assert cut.num_target_tokens == whole.num_target_tokens  # the answer and its eos, whole
    text = tokenizer.decode(cut.input_ids)
    assert "### Instruction:\nTranslate to French." in text
    assert "Good morning Good" in text and text.count("morning") < 40
    assert re.search(r"(Good|morning) \[\.\.\.\]\n\n### Response:\nBonjour<eos>$", text)
    # the longest input that fits: one more word would not
    shown = fit_context(long, tokenizer, limit - whole.num_target_tokens)
    kept = shown.input.removesuffix(CONTEXT_CUT)
    assert long.input.startswith(kept) and long.input[len(kept)] == " "
    next_word = long.input[len(kept) :].split()[0]
    longer = replace(long, input=f"{kept} {next_word}{CONTEXT_CUT}")
    assert len(tokenize_example(longer, tokenizer, 2048).input_ids) > limit
    assert fit_context(WITH_INPUT, tokenizer, 512) is WITH_INPUT
    squeezed = fit_context(long, tokenizer, 3)  # the instruction alone is too long
    assert squeezed.input == CONTEXT_CUT.strip() and squeezed.instruction == long.instruction


def test_an_answer_too_long_even_without_the_input_is_truncated_at_the_end(tokenizer):
    full = tokenize_example(NO_INPUT, tokenizer, max_length=512)
    limit = len(full.input_ids) - 2
    cut = tokenize_example(NO_INPUT, tokenizer, max_length=limit)
    assert cut.answer_cut and not cut.context_cut and not full.answer_cut
    assert cut.input_ids == full.input_ids[:limit]
    assert cut.labels == full.labels[:limit]
    assert tokenizer.eos_token_id not in cut.labels


def test_examples_whose_instruction_fills_max_length_are_dropped(tokenizer, caplog):
    long = InstructionExample("Translate to French. " * 30, "Good morning", "Bonjour")
    limit = len(tokenize_example(WITH_INPUT, tokenizer, 512).input_ids)
    kept = tokenize_examples([WITH_INPUT, long, NO_INPUT], tokenizer, max_length=limit)
    assert len(kept) == 2 and all(example.num_target_tokens > 0 for example in kept)
    assert "dropped 1 of 3" in caplog.text
    with pytest.raises(FlexMoEError, match="increase the maximum sequence length"):
        tokenize_examples([long], tokenizer, max_length=limit)


def test_max_length_must_be_at_least_two(tokenizer):
    with pytest.raises(FlexMoEError, match="at least 2"):
        tokenize_example(NO_INPUT, tokenizer, max_length=1)


def test_tokenizer_without_eos_is_rejected_for_training_only(tokenizer):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(FlexMoEError, match="no eos token"):
        tokenize_example(NO_INPUT, bare, max_length=64)
    scored = tokenize_example(NO_INPUT, bare, max_length=64, terminate=False)
    assert scored.input_ids[-1] == bare.encode(NO_INPUT.output)[-1]
    assert pad_token_id(bare) == 0


def test_pad_id_falls_back_to_eos(tokenizer):
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<pad>")
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>"
    )
    assert pad_token_id(no_pad) == no_pad.eos_token_id


def test_encode_prompt_keeps_the_response_cue(tokenizer):
    prompt = encode_prompt(WITH_INPUT, tokenizer)
    assert tokenizer.decode(prompt) == format_prompt(WITH_INPUT)
    tail = encode_prompt(WITH_INPUT, tokenizer, max_length=5)
    assert tail == prompt[-5:] and tokenizer.decode(tail).endswith("### Response:\n")
    long = replace(WITH_INPUT, input="Good morning " * 40)
    room = len(prompt) + 10
    fitted = encode_prompt(long, tokenizer, max_length=room)
    assert len(fitted) <= room and "Translate to French." in tokenizer.decode(fitted)
    assert fitted == encode_prompt(fit_context(long, tokenizer, room), tokenizer)


def test_collate_right_pads_with_pad_id_and_ignores_padding():
    batch = [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [8])]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(tensor.dtype == torch.long for tensor in out.values())


def test_collate_prompts_left_pads_for_generation():
    out = collate_prompts([[1, 2, 3], [4]], pad_id=9)
    assert out["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_rejects_empty_batches():
    with pytest.raises(FlexMoEError):
        collate([], pad_id=0)
    with pytest.raises(FlexMoEError):
        collate_prompts([], pad_id=0)


def take(items, batch_size, seed, count, start_step=0):
    return list(itertools.islice(iterate_batches(items, batch_size, seed, start_step), count))


def test_batches_are_fixed_size_and_each_pass_visits_every_item_once():
    items = list(range(10))
    batches = take(items, batch_size=4, seed=3, count=15)  # 60 draws = 6 full passes
    assert all(len(batch) == 4 for batch in batches)
    flat = [item for batch in batches for item in batch]
    passes = [flat[i : i + 10] for i in range(0, 60, 10)]
    assert all(sorted(one_pass) == items for one_pass in passes)
    assert len({tuple(one_pass) for one_pass in passes}) > 1  # reshuffled between passes


def test_batches_are_deterministic_from_the_seed_and_resumable():
    items = list("abcdefg")
    assert take(items, 3, seed=1, count=8) == take(items, 3, seed=1, count=8)
    assert take(items, 3, seed=1, count=8) != take(items, 3, seed=2, count=8)
    assert take(items, 3, seed=1, count=5, start_step=3) == take(items, 3, seed=1, count=8)[3:]


def test_batch_larger_than_the_data_cycles():
    batch = take([1, 2, 3], batch_size=7, seed=0, count=1)[0]
    assert len(batch) == 7 and Counter(batch[:6]) == Counter([1, 2, 3] * 2)


@pytest.mark.parametrize(("items", "batch_size", "seed"), [([], 2, 0), ([1], 0, 0), ([1], 2, -1)])
def test_bad_batching_arguments(items, batch_size, seed):
    with pytest.raises(FlexMoEError):
        iterate_batches(items, batch_size, seed)  # checked on the call, not on the first next()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The same tokenizer with a chat template, a bos it adds by itself, and <|im_end|> as eos."""
    chat = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<pad>"
    )
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.eos_token = "<|im_end|>"
    chat.chat_template = CHAT_TEMPLATE
    return chat


def test_a_model_with_a_chat_template_is_prompted_in_it(chat_tokenizer):
    expected = (
        "<|im_start|>user\nTranslate to French.\n\nGood morning<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_prompt(WITH_INPUT, chat_tokenizer) == expected
    assert format_prompt(NO_INPUT, chat_tokenizer).startswith("<|im_start|>user\nName a primary")
    assert format_prompt(WITH_INPUT) == PROMPT_WITH_INPUT.format(
        instruction=WITH_INPUT.instruction, input=WITH_INPUT.input
    )


def test_chat_prompts_hold_the_template_tokens_once_and_end_the_answer_with_its_eos(
    chat_tokenizer,
):
    start = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokenized = tokenize_example(NO_INPUT, chat_tokenizer, max_length=200)
    prompt = encode_prompt(NO_INPUT, chat_tokenizer)
    assert tokenized.input_ids[: len(prompt)] == prompt
    assert prompt.count(start) == 2  # the user turn and the assistant cue, nothing added
    assert tokenized.input_ids[-1] == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat_tokenizer.decode(tokenized.input_ids[len(prompt) : -1]) == NO_INPUT.output


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_selection_marks_the_content_or_the_answer_and_never_the_template(
    tokenizer, chat_tokenizer, template
):
    chosen = chat_tokenizer if template == "chat" else tokenizer
    plain = tokenize_example(WITH_INPUT, chosen, max_length=200)
    assert plain.scored is None  # "all": every token
    for scored, wanted in [("content", "Translate to French.Good morningBonjour"),
                           ("answer", "Bonjour")]:  # fmt: skip
        marked = tokenize_example(WITH_INPUT, chosen, max_length=200, selection_tokens=scored)
        assert (marked.input_ids, marked.labels) == (plain.input_ids, plain.labels)
        assert len(marked.scored) == len(marked.input_ids)
        kept = [i for i, mark in zip(marked.input_ids, marked.scored, strict=True) if mark]
        assert chosen.decode(kept).replace(" ", "") == wanted.replace(" ", "")
    batch = collate([tokenize_example(NO_INPUT, chosen, 200, selection_tokens="answer"), plain], 0)
    assert batch["scored_mask"][1].tolist() == batch["attention_mask"][1].tolist()
    with pytest.raises(FlexMoEError, match="unknown selection tokens 'prompt'"):
        tokenize_example(WITH_INPUT, chosen, max_length=200, selection_tokens="prompt")
