"""The default max-length: smol-moe's training step time against the share of Dolly that fits.

    python benchmarks/dolly/max_length.py [--lengths 256,384,512,768,1024] [--steps 3]

For every length L, over the packaged Dolly-15k's four paper categories (smol-moe's tokenizer
and chat template), the share of examples that fit whole, that fit once their context is cut
short, and whose answer is cut even so; then the seconds of one local training step (attention
LoRA r32 on the float32 base, batch 4 as in the paper) on the same 32 examples (8 a category,
the first of each category's training share), tokenized at L. Writes
``benchmarks/results/dolly/max_length.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from flexmoe.data import (
    PAPER_CATEGORIES,
    collate,
    format_prompt,
    hold_out_test_pools,
    load_dataset,
    pad_token_id,
    select_categories,
    tokenize_example,
)
from flexmoe.flex import FlexConfig, FlexModel
from flexmoe.hardware import Placement
from flexmoe.methods import get_method
from flexmoe.models.loading import load_model
from flexmoe.training import train_steps

OUT = Path(__file__).resolve().parents[1] / "results" / "dolly" / "max_length.json"
BATCH = 4
PER_CATEGORY = 8


def lengths_of(examples, tokenizer) -> list[tuple[int, int, int]]:
    """(whole prompt, prompt without its context, answer + eos) tokens of every example."""
    whole = tokenizer([format_prompt(e, tokenizer) for e in examples], add_special_tokens=False)
    bare = [replace(e, input="") for e in examples]
    empty = tokenizer([format_prompt(e, tokenizer) for e in bare], add_special_tokens=False)
    answers = tokenizer([e.output for e in examples], add_special_tokens=False)
    return [
        (len(w), len(b), len(a) + 1)
        for w, b, a in zip(
            whole["input_ids"], empty["input_ids"], answers["input_ids"], strict=True
        )
    ]


def fit_shares(lengths: list[tuple[int, int, int]], limit: int) -> dict[str, float]:
    whole = sum(p + a <= limit for p, _, a in lengths)
    answer_cut = sum(b + a > limit for _, b, a in lengths)
    n = len(lengths)
    return {
        "whole": whole / n,
        "context_cut": (n - whole - answer_cut) / n,
        "answer_cut": answer_cut / n,
    }


def step_seconds(model, tokenizer, examples, limit: int, steps: int) -> tuple[float, float]:
    """Mean seconds of a training step after one warm-up, and the mean padded tokens a batch."""
    tokenized = [tokenize_example(e, tokenizer, limit) for e in examples]
    batches = [
        collate(tokenized[i : i + BATCH], pad_token_id(tokenizer))
        for i in range(0, len(tokenized), BATCH)
    ]
    cycle = itertools.cycle(batches)
    train_steps(model, cycle, 1, 1e-4)  # warm-up
    start = time.perf_counter()
    train_steps(model, cycle, steps, 1e-4)
    seconds = (time.perf_counter() - start) / steps
    return seconds, sum(b["input_ids"].numel() for b in batches) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,384,512,768,1024")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    limits = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    base, tokenizer = load_model("smol-moe", Placement.resolve("cpu", "float32"))
    model = FlexModel(base, config=FlexConfig(shared=get_method("fedavg").shared)).model
    examples = select_categories(load_dataset("dolly"), "default")
    train = hold_out_test_pools(examples, 100, 0.2).train
    lengths = lengths_of(examples, tokenizer)
    by_category = {c: [e for e in train if e.category == c] for c in PAPER_CATEGORIES}
    sample = [e for c in PAPER_CATEGORIES for e in by_category[c][:PER_CATEGORY]]
    sample = [sample[i] for i in torch.randperm(len(sample)).tolist()]  # mixed batches
    rows = []
    for limit in limits:
        shares = {
            c: fit_shares(
                [n for n, e in zip(lengths, examples, strict=True) if e.category == c], limit
            )
            for c in PAPER_CATEGORIES
        }
        seconds, tokens = step_seconds(model, tokenizer, sample, limit, args.steps)
        rows.append(
            {
                "max_length": limit,
                "step_s": round(seconds, 2),
                "batch_tokens": tokens,
                "all": fit_shares(lengths, limit),
                "per_category": shares,
            }
        )
        overall = rows[-1]["all"]
        print(
            f"max-length {limit:>5}: step {seconds:6.2f} s ({tokens:.0f} tokens a batch); "
            f"whole {overall['whole']:.1%}, context cut {overall['context_cut']:.1%}, "
            f"answer cut {overall['answer_cut']:.1%}",
            flush=True,
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": "smol-moe", "batch_size": BATCH, "rows": rows}, indent=1))
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
