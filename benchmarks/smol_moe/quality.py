"""How much smol-moe keeps of its dense source, SmolLM2-135M-Instruct, measured side by side.

    python benchmarks/smol_moe/quality.py [--mmlu-limit 20] [--top-k 8,10,12,14,16]

Held-out perplexity per domain of the dense model and of the carving at each top-k; MMLU 0-shot
of both on the same questions (with the paired difference); how differently the carving routes
each domain (expert specialisation); and greedy answers of both to instructions written for this
benchmark (not from Natural Instructions or MMLU). Each part is saved to
``benchmarks/results/smol_moe/quality.json`` as it finishes and skipped on a re-run with the
same build of smol-moe (its carve report unchanged).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from flexmoe.cache import cache_dir
from flexmoe.data import InstructionExample, heldout_texts, text_batches
from flexmoe.evaluation.generation import generate_answers, rouge_l
from flexmoe.evaluation.mmlu import (
    build_prompt,
    choice_logprobs,
    fetch_mmlu,
    load_mmlu,
    split_few_shot,
)
from flexmoe.evaluation.perplexity import domain_perplexities
from flexmoe.evaluation.routing import routing_statistics
from flexmoe.flex.moe import find_moe_blocks
from flexmoe.io import atomic_write_text
from flexmoe.models.loading import SMOL_GGUF, SMOL_MOE, load_dense_model, load_model, smol_moe_path

OUT = Path(__file__).resolve().parents[1] / "results" / "smol_moe" / "quality.json"
INSTRUCTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "What is 12 plus 7?",
    "Give a synonym for 'happy'.",
    "Translate 'thank you' into Spanish.",
    "What do bees make?",
    "List two fruits that are red.",
    "Explain in one sentence what a computer is.",
    "What is the opposite of 'cold'?",
    "Write a Python expression that adds 2 and 3.",
    "Who wrote 'Romeo and Juliet'?",
    "How many days are there in a week?",
    "Suggest a name for a pet cat.",
    "What colour is the sky on a clear day?",
    "Finish the sentence: The early bird ...",
    "What is water made of?",
    "Give one tip for sleeping well.",
    "What is the largest planet in the solar system?",
    "Describe a tree in five words.",
]


def set_top_k(model: torch.nn.Module, k: int) -> None:
    for view in find_moe_blocks(model):
        view.router.top_k = k


def perplexities(dense, carved, tokenizer, ks: list[int]) -> dict:
    result = {"dense": domain_perplexities(dense, tokenizer)}
    default = carved.config.num_experts_per_tok
    for k in ks:
        set_top_k(carved, k)
        result[f"top-{k}"] = domain_perplexities(carved, tokenizer)
        print(f"top-{k}: mean {statistics.fmean(result[f'top-{k}'].values()):.2f}", flush=True)
    set_top_k(carved, default)
    return result


def mmlu(dense, carved, tokenizer, limit: int) -> dict:
    _, test = split_few_shot(load_mmlu(fetch_mmlu()), 5)
    first, _ = split_few_shot(test, limit)
    questions = [q for group in first.values() for q in group]
    prompts = [build_prompt(q) for q in questions]
    right, letters, chosen = {}, {}, {}
    for name, model in (("dense", dense), ("carved", carved)):
        logprobs, _ = choice_logprobs(model, tokenizer, prompts, batch_size=8)
        picks = logprobs.argmax(dim=-1).tolist()
        right[name] = [int(p == q.answer) for p, q in zip(picks, questions, strict=True)]
        letters[name] = [picks.count(c) / len(picks) for c in range(4)]  # a letter bias shows
        chosen[name] = picks
    differences = [c - d for c, d in zip(right["carved"], right["dense"], strict=True)]
    n = len(questions)
    return {
        "questions": n,
        "per_topic": limit,
        "dense": statistics.fmean(right["dense"]),
        "carved": statistics.fmean(right["carved"]),
        "difference": statistics.fmean(differences),
        "difference_se": statistics.stdev(differences) / math.sqrt(n),
        "same_correctness": statistics.fmean(int(d == 0) for d in differences),
        "same_pick": statistics.fmean(
            int(a == b) for a, b in zip(chosen["dense"], chosen["carved"], strict=True)
        ),
        "letter_share": letters,  # of the model's picks, for A, B, C, D
        "answer_share": [sum(q.answer == c for q in questions) / n for c in range(4)],
    }


def specialisation(carved, tokenizer) -> dict:
    """Per layer, the total-variation distance of each domain's expert use from all domains',
    and of two halves of one domain from each other (the noise floor)."""
    usage, halves = {}, {}
    for domain, text in heldout_texts().items():
        batches = text_batches(tokenizer, [text], seq_len=256, batch_size=4)
        usage[domain] = _utilisation(carved, batches)
        middle = len(batches) // 2
        halves[domain] = (
            _utilisation(carved, batches[:middle]),
            _utilisation(carved, batches[middle:]),
        )
    mix = torch.tensor(list(usage.values())).mean(dim=0).tolist()  # [layers, experts]
    layers = len(mix)
    distance = {d: [_tv(u[layer], mix[layer]) for layer in range(layers)] for d, u in usage.items()}
    noise = {
        d: [_tv(a[layer], b[layer]) for layer in range(layers)] for d, (a, b) in halves.items()
    }
    return {"domain_vs_mix": distance, "half_vs_half": noise, "utilisation": usage}


def _utilisation(model, batches) -> list[list[float]]:
    return [layer.utilisation for layer in routing_statistics(model, batches).layers]


def _tv(first: list[float], second: list[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(first, second, strict=True))


def answers(dense, carved, tokenizer) -> dict:
    examples = [InstructionExample(text, "", "") for text in INSTRUCTIONS]
    replies = {
        name: generate_answers(model, tokenizer, examples, max_new_tokens=40, max_prompt_tokens=128)
        for name, model in (("dense", dense), ("carved", carved))
    }
    overlap = rouge_l(replies["carved"], replies["dense"])
    return {
        "instructions": INSTRUCTIONS,
        **replies,
        "rouge_l_carved_vs_dense": overlap,
        "mean_rouge_l": statistics.fmean(overlap),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mmlu-limit", type=int, default=20, help="questions per topic")
    parser.add_argument("--top-k", default="8,10,12,14,16", help="top-k values for perplexity")
    args = parser.parse_args()
    torch.manual_seed(0)
    carving = json.loads((smol_moe_path() / "carve_report.json").read_text())
    carving.pop("layers")
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    if results.get("carving") != carving:  # parts measured on another build are not kept
        results = {"carving": carving}
    carved, tokenizer = load_model(SMOL_MOE)
    dense, _ = load_dense_model(cache_dir() / "models" / Path(SMOL_GGUF).name)
    ks = [int(k) for k in args.top_k.split(",")]
    parts = {
        "perplexity": lambda: perplexities(dense, carved, tokenizer, ks),
        "mmlu": lambda: mmlu(dense, carved, tokenizer, args.mmlu_limit),
        "answers": lambda: answers(dense, carved, tokenizer),
        "specialisation": lambda: specialisation(carved, tokenizer),
    }
    for name, measure in parts.items():
        if name in results:
            continue
        started = time.perf_counter()
        results[name] = measure()
        results[name + "_wall_s"] = round(time.perf_counter() - started, 1)
        atomic_write_text(OUT, json.dumps(results, indent=1))
        print(f"{name} done in {results[name + '_wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
