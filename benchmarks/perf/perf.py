"""The performance ratios of issue 11, each measured side by side in one run of its section.

    python benchmarks/perf/perf.py [--only SECTION,...] [--force]

Sections (each writes ``OUT/<section>.json``; a finished section is skipped unless ``--force``,
so an interrupted run resumes):

- ``speed``: smol-moe's local step (4 Dolly examples at max-length 512) and greedy answers (128
  new tokens) with transformers' default fused experts (``grouped_mm``) and flexmoe's on the CPU
  (``eager``), in float32, in bfloat16 and in bfloat16 mixed precision, and in batches of 4 and 32;
- ``padding``: how much of what the Dolly benchmark's steps compute is padding, per split;
- ``micro-batches``: smol-moe's local step on the Dolly benchmark's own batches, the whole batch
  at once against one example at a time (``micro-batch-size 1``: no padding);
- ``uplink``: bytes of a real FLEx train reply against a real ``fedavg-full`` one (tiny,
  smol-moe), and ``flexmoe plan``'s ratio for the paper's Qwen1.5-MoE-A2.7B;
- ``grafting``: selection + surgery (with the default token budget, and scoring every token)
  against one forward pass over the same 64 Dolly training examples;
- ``budget``: how often a token budget picks the expert that every token picks (smol-moe);
- ``steps``: a FLEx local step against a full fine-tuning step of the same model and batches;
- ``latency``: the personalised model's forward (one grafted expert per layer) against the base's;
- ``overhead``: a client's per-round load + restore + save against its compute on smol-moe, with
  the base model kept loaded (now) and reloaded for every round (before);
- ``deployment``: round wall time against a client's compute on a real local deployment of
  smol-moe (TLS SuperLink, two SuperNodes), with a node worker per SuperNode and without;
- ``rounds``: simulation round wall time against the clients' compute, two clients in parallel;
- ``clients``: peak memory of the whole process tree and time per round, 100 clients sampling 10
  per round against 4 clients;
- ``server``: the server's peak memory taking in a round of fedavg-full replies at 4, 10 and 50
  clients, folded as they arrive and all kept.

Then prints every ratio with its goal and the numbers behind it, and writes ``OUT/summary.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from flexmoe.client import ClientWorker
from flexmoe.client.base_models import BASE_MODELS
from flexmoe.data import heldout_texts, text_batches
from flexmoe.evaluation.cost import latency_ratio
from flexmoe.evaluation.plan import plan
from flexmoe.federated.federation import initial_arrays
from flexmoe.federated.protocol import TrainReply
from flexmoe.federated.records import arrays_to_state, wire_bytes
from flexmoe.flex import FlexConfig, FlexModel
from flexmoe.flex.moe import exact_routers, find_moe_blocks
from flexmoe.flex.selection import scored_token_masks, token_errors, visit_block_inputs
from flexmoe.hardware import Placement, Stopwatch
from flexmoe.methods import get_method
from flexmoe.models.loading import load_model
from flexmoe.results import ROUNDS_FILE, read_rounds, work_seconds
from flexmoe.settings import Settings
from flexmoe.training import train_steps

OUT = Path(__file__).resolve().parents[1] / "results" / "perf"
MODELS = ("tiny", "smol-moe")
CPU32 = Placement.resolve("cpu", "float32")


def calibration(name: str, batches: int = 4, batch_size: int = 4, seq_len: int = 128) -> list:
    """Batches of held-out text with labels (every token), the same for every measurement."""
    _, tokenizer = load_model(name)
    out = text_batches(tokenizer, heldout_texts().values(), seq_len, batch_size, batches)
    return [
        {**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in out
    ]


def step_seconds(model: torch.nn.Module, batches: list, steps: int = 3) -> tuple[float, float]:
    """Median seconds of one optimizer step after a warm-up step, and the first step's loss."""
    losses = train_steps(model, iter(batches), 1, 1e-4)
    seconds = []
    for i in range(steps):
        clock = Stopwatch(next(model.parameters()).device)
        with clock.lap("step"):
            train_steps(model, iter(batches[i % len(batches) :]), 1, 1e-4)
        seconds.append(clock.seconds["step"])
    return statistics.median(seconds), losses[0]


def flex_model(name: str, placement: Placement, batches: list, method: str = "flex") -> FlexModel:
    base, _ = load_model(name, placement)
    torch.manual_seed(0)
    shared = get_method(method).shared
    if get_method(method).grafts:
        return FlexModel.graft(base, batches, FlexConfig(shared=shared))[0]
    return FlexModel(base, config=FlexConfig(shared=shared))


# a local step's setups on smol-moe, slowest first: (dtype, experts implementation, autocast)
STEP_SETUPS = {
    "fp32 grouped_mm (transformers)": ("float32", "grouped_mm", False),
    "fp32 eager (flexmoe fp32)": ("float32", "eager", False),
    "bf16 weights eager, no autocast": ("bfloat16", "eager", False),
    "bf16 mixed eager (flexmoe bf16)": ("bfloat16", "eager", True),
}
GENERATION_SETUPS = {  # (dtype, experts implementation, autocast, batch size)
    "fp32 grouped_mm b4": ("float32", "grouped_mm", False, 4),
    "fp32 eager b32": ("float32", "eager", False, 32),
    "bf16 mixed eager b32": ("bfloat16", "eager", True, 32),
}
NEW_TOKENS = 128


def dolly_sample(per_category: int, test: bool) -> list:
    """The first training or test examples of each of the paper's categories, mixed."""
    from flexmoe.data import PAPER_CATEGORIES, hold_out_test_pools, load_dataset, select_categories

    pools = hold_out_test_pools(select_categories(load_dataset("dolly"), "default"), 100, 0.2)
    by_category = (
        pools.pools
        if test
        else {c: [e for e in pools.train if e.category == c] for c in PAPER_CATEGORIES}
    )
    return [
        e for i in range(per_category) for c in PAPER_CATEGORIES for e in by_category[c][i : i + 1]
    ]


def setup_model(dtype: str, experts: str) -> tuple[FlexModel, object, Placement]:
    """smol-moe with the shared attention LoRA, computing its experts as ``experts`` says."""
    placement = Placement.resolve("cpu", dtype)
    base, tokenizer = load_model("smol-moe", placement)
    base.set_experts_implementation(experts)
    exact_routers(base)  # as a client's base: routers outside autocast
    torch.manual_seed(0)
    return (
        FlexModel(base, config=FlexConfig(shared=get_method("fedavg").shared)),
        tokenizer,
        placement,
    )


def section_speed() -> dict:
    """A local training step (4 Dolly examples at max-length 512) and greedy answers (128 new
    tokens) on smol-moe, in each setup, side by side."""
    from flexmoe.data import collate, pad_token_id, tokenize_example
    from flexmoe.evaluation.generation import generate_answers

    train, test = dolly_sample(4, test=False), dolly_sample(8, test=True)
    steps = {}
    for name, (dtype, experts, mixed) in STEP_SETUPS.items():
        model, tokenizer, placement = setup_model(dtype, experts)
        tokenized = [tokenize_example(e, tokenizer, 512) for e in train]
        batches = [collate(tokenized[i : i + 4], pad_token_id(tokenizer)) for i in range(0, 16, 4)]
        with placement.autocast() if mixed else contextlib.nullcontext():
            seconds, loss = step_seconds(model.model, batches, steps=4)
        tokens = statistics.fmean(int(b["attention_mask"].sum()) for b in batches)
        steps[name] = {"step_s": seconds, "first_loss": loss, "tokens_per_step": tokens}
    answers = {}
    for name, (dtype, experts, mixed, batch_size) in GENERATION_SETUPS.items():
        model, tokenizer, placement = setup_model(dtype, experts)
        started = time.perf_counter()
        with placement.autocast() if mixed else contextlib.nullcontext():
            generate_answers(model, tokenizer, test, NEW_TOKENS, 512 - NEW_TOKENS, batch_size)
        answers[name] = {"s_per_example": (time.perf_counter() - started) / len(test)}
    return {"steps": steps, "generation": answers, "test_examples": len(test)}


# the Dolly benchmark's splits (benchmarks/smol_moe/benchmark.sh): settings, and rounds a cell runs
BENCH_SPLITS = {
    "pathological": ({"max_train": 200}, 10),
    "dirichlet-1.0": ({"split": "dirichlet", "clients": 10, "max_train": 100}, 5),
}


def bench_batches(settings: Settings, steps_per_client: int) -> list[dict]:
    """Each client's first training batches, drawn and collated as a run's clients do."""
    from flexmoe.data import collate, iterate_batches, pad_token_id

    batches = []
    with tempfile.TemporaryDirectory() as state:
        for client in range(settings.federation.clients):
            worker = ClientWorker(settings, client, Path(state))
            drawn = iterate_batches(worker.train_examples, settings.train.batch_size, worker.seed)
            pad_id = pad_token_id(worker.tokenizer)
            batches += [collate(next(drawn), pad_id) for _ in range(steps_per_client)]
    return batches


def token_counts(batches: list[dict]) -> dict[str, int]:
    """The real tokens of ``batches`` and the tokens they hold padded."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"real_tokens": real, "padded_tokens": sum(b["attention_mask"].numel() for b in batches)}


def section_padding() -> dict:
    """Real and padded tokens of every training step a cell of the Dolly benchmark takes, per
    split, its batches drawn and collated as its clients draw them (no model runs)."""
    counts = {}
    for split, (overrides, rounds) in BENCH_SPLITS.items():
        settings = Settings.of(model="smol-moe", **overrides)
        counts[split] = token_counts(bench_batches(settings, rounds * settings.train.local_steps))
    return counts


def section_micro_batches(steps_per_client: int = 3) -> dict:
    """A local step on smol-moe (float32) as the Dolly benchmark's pathological clients draw
    them (4 examples at max-length 512), the whole batch at once against one example at a time,
    alternating on the same batches."""
    settings = Settings.of(model="smol-moe", dtype="float32", **BENCH_SPLITS["pathological"][0])
    batches = bench_batches(settings, steps_per_client)
    model = setup_model("float32", "eager")[0].model
    sizes = {"whole batch": 0, "micro-batch-size 1": 1}
    for size in sizes.values():  # warm-up
        train_steps(model, iter(batches), 1, 1e-4, micro_batch_size=size)
    clocks = {name: Stopwatch(next(model.parameters()).device) for name in sizes}
    for batch in batches:
        for name, size in sizes.items():
            with clocks[name].lap("steps"):
                train_steps(model, iter([batch]), 1, 1e-4, micro_batch_size=size)
    rows = {name: clock.seconds["steps"] for name, clock in clocks.items()}
    return {**rows, "steps": len(batches), **token_counts(batches)}


def reply_bytes(name: str, method: str, lora_rank: int = 32) -> int:
    config = Settings.of(
        lora_rank=lora_rank,
        model=name,
        method=method,
        clients=4,
        rounds=1,
        local_steps=1,
        batch_size=2,
        max_train=8,
        max_test=2,
        device="cpu",
        dtype="float32",
    )
    worker = ClientWorker(config, 0, OUT / "scratch" / f"{name}-{method}-{lora_rank}")
    shared = arrays_to_state(initial_arrays(config, config.chosen_method()))
    result = worker.train(1, shared)
    reply = TrainReply(
        0, result.num_examples, result.train_loss, result.lr, 0.0, shared=result.shared
    )
    return wire_bytes(reply.to_content())


def section_uplink() -> dict:
    rows = {name: {m: reply_bytes(name, m) for m in ("flex", "fedavg-full")} for name in MODELS}
    rows["smol-moe, LoRA rank 16"] = {
        "flex": reply_bytes("smol-moe", "flex", 16),
        "fedavg-full": rows["smol-moe"]["fedavg-full"],
    }
    paper = plan("qwen1.5-moe-a2.7b", [get_method("flex"), get_method("fedavg-full")])
    rows["qwen1.5-moe-a2.7b (plan)"] = {m.method: m.bytes_up for m in paper.methods}
    return rows


def selection_batches(tokenizer, examples: list) -> list:
    """A client's selection data as a run batches it: max-length 512, 4 examples a batch."""
    from flexmoe.data import pad_token_id, sequential_batches, tokenize_examples

    tokenized = tokenize_examples(examples, tokenizer, 512)
    return sequential_batches(tokenized, 4, pad_token_id(tokenizer))


def section_grafting() -> dict:
    """Grafting as a run does by default (64 training examples, a token budget per layer) and
    scoring every token, against one forward (every position's logits, as training computes)
    over the same 64 Dolly training examples, 16 of each of the paper's categories."""
    rows = {}
    examples = dolly_sample(16, test=False)
    for name in MODELS:
        base, tokenizer = load_model(name, CPU32)
        exact_routers(base)
        batches = selection_batches(tokenizer, examples)
        clock = Stopwatch(CPU32.device)
        with torch.no_grad(), clock.lap("forward"):
            for batch in batches:
                base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for lap, budget in (("graft", FlexConfig().selection_token_budget), ("graft_all", 0)):
            with clock.lap(lap):
                model, _ = FlexModel.graft(base, batches, FlexConfig(selection_token_budget=budget))
            model.unload()
        rows[name] = {
            **clock.seconds,
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "budget": FlexConfig().selection_token_budget,
        }
    return rows


BUDGETS = (256, 512, 1024, 2048, 4096, 8192)
DRAWS = 10


def section_budget() -> dict:
    """How often grafting from a token budget picks the expert that scoring every token picks,
    on smol-moe with 64 training examples of each paper category (a pathological client's
    selection), over ``DRAWS`` seeds of the draw: every token's criterion is computed once and
    each draw's loss summed from it, exactly as ``select_experts`` would."""
    from flexmoe.data import PAPER_CATEGORIES

    base, tokenizer = load_model("smol-moe", CPU32)
    exact_routers(base)
    views = find_moe_blocks(base)
    pools = dolly_sample(64, test=False)
    rows = {}
    for category in PAPER_CATEGORIES:
        examples = [e for e in pools if e.category == category]
        batches = selection_batches(tokenizer, examples)
        errors = token_errors_by_batch(base, views, batches)
        everything = {layer: budget_losses(per_batch, None) for layer, per_batch in errors.items()}
        best = {layer: int(losses.argmin()) for layer, losses in everything.items()}
        rows[category] = {"tokens": sum(int(b["attention_mask"].sum()) for b in batches)}
        for budget in BUDGETS:
            same, regret = [], []
            for seed in range(DRAWS):
                drawn = drawn_tokens(batches, budget, seed)
                for layer, per_batch in errors.items():
                    chosen = int(budget_losses(per_batch, drawn).argmin())
                    same.append(chosen == best[layer])
                    full = everything[layer]
                    regret.append(float(full[chosen] / full[best[layer]] - 1))
            rows[category][str(budget)] = {
                "same_expert": statistics.fmean(same),
                "mean_regret": statistics.fmean(regret),
                "max_regret": max(regret),
            }
    return rows


@torch.no_grad()
def token_errors_by_batch(model, views, batches) -> dict[int, list[torch.Tensor]]:
    """Every singleton's squared error on every real token: per layer, one ``[E, n]`` per batch
    (tokens in the order of the batch's attention mask)."""
    errors: dict[int, list[torch.Tensor]] = {v.layer: [] for v in views}

    def record(view, tokens: torch.Tensor) -> None:
        singletons = torch.eye(view.num_experts, dtype=torch.bool)
        errors[view.layer].append(token_errors(view, tokens, singletons).double().cpu())

    model.eval()
    with visit_block_inputs(views, record) as scored:
        for batch in batches:
            scored["mask"] = batch["attention_mask"].bool().flatten()
            inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
            model(**inputs, use_cache=False, logits_to_keep=1)
    return errors


def drawn_tokens(batches: list, budget: int, seed: int) -> list[torch.Tensor] | None:
    """Per batch, which real tokens (in the order of its attention mask) a budget's draw scores;
    None for a budget of 0 (every token)."""
    if not budget:
        return None
    masks = scored_token_masks(batches, budget, seed)
    return [m[b["attention_mask"].bool()] for m, b in zip(masks, batches, strict=True)]


def budget_losses(per_batch: list[torch.Tensor], drawn: list[torch.Tensor] | None) -> torch.Tensor:
    """``L({e})`` for every expert: the sum over batches of the norm over the drawn tokens."""
    if drawn is None:
        drawn = [torch.ones(e.shape[1], dtype=torch.bool) for e in per_batch]
    return sum(e[:, d].sum(dim=1).sqrt() for e, d in zip(per_batch, drawn, strict=True))


def section_steps() -> dict:
    rows = {}
    for name in MODELS:
        batches = calibration(name, 3, 2, 128)
        rows[name] = {
            method: step_seconds(flex_model(name, CPU32, batches, method).model, batches)[0]
            for method in ("flex", "fedavg-full")
        }
    return rows


def section_latency() -> dict:
    rows = {}
    for name in MODELS:
        batches = calibration(name)
        rows[name] = latency_ratio(flex_model(name, CPU32, batches), batches, repeats=7)
    return rows


def section_overhead() -> dict:
    """Three rounds of one smol-moe client, the base kept and the base reloaded every round."""
    config = Settings.of(
        model="smol-moe",
        clients=4,
        rounds=3,
        local_steps=4,
        batch_size=4,
        max_train=64,
        max_test=8,
        device="cpu",
        dtype="float32",
    )
    shared = arrays_to_state(initial_arrays(config, get_method("flex")))
    rows = {}
    for mode in ("kept", "reloaded"):
        BASE_MODELS.drop()
        worker = ClientWorker(config, 0, OUT / "scratch" / f"overhead-{mode}")
        rounds = []
        for round_ in range(1, 4):
            if mode == "reloaded":
                BASE_MODELS.drop()  # as before: every message loaded the base afresh
            rounds.append(worker.train(round_, shared).seconds)
        rows[mode] = rounds
    return rows


def simulate(args: list[str], out: Path) -> dict:
    """``flexmoe run`` in a subprocess, sampling the peak memory of its whole process tree."""
    shutil.rmtree(out, ignore_errors=True)  # a section is measured whole
    process = psutil.Popen(
        [sys.executable, "-m", "flexmoe", "run", "--out", str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = {"bytes": 0}
    started = time.perf_counter()

    def sample() -> None:
        while process.poll() is None:
            peak["bytes"] = max(peak["bytes"], tree_memory(process))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    process.wait()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"flexmoe run {' '.join(args)} failed ({process.returncode})")
    rounds = [
        {
            "wall_s": r.wall_s,
            "clients": len(r.clients),
            "client_s": r.client_seconds,
            "seconds": [c.seconds for c in r.clients],
        }
        for r in read_rounds(out / ROUNDS_FILE)
    ]
    return {"peak_bytes": peak["bytes"], "wall_s": time.perf_counter() - started, "rounds": rounds}


def tree_memory(process: psutil.Process) -> int:
    """Proportional set size of ``process`` and every descendant (shared pages counted once)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # it just ended
            total += member.memory_full_info().pss
    return total


PROCESSES = os.cpu_count() or 1  # simulated client processes: one per core (CPU runs)
# three short rounds on the CPU, for the sections that measure what is not compute
SHORT = "--rounds 3 --local-steps 4 --batch-size 4 --max-train 32 --max-new-tokens 4 --device cpu"
SMALL = [*SHORT.split(), "--max-test", "2"]
DEPLOYMENT = [  # flexmoe deploy-local's options in the deployment section
    *("--model", "smol-moe", "--supernodes", "2", *SHORT.split(), "--timeout", "3600"),
    *("--max-test", "8"),  # a SuperNode evaluates on at least 8 (NodeLimits.min_test_size)
]


def section_deployment() -> dict:
    """smol-moe on a real local deployment, with a node worker per SuperNode and without."""
    rows = {}
    for mode, extra in (("node worker", []), ("a process per message", ["--no-node-worker"])):
        out = OUT / "scratch" / f"deploy-{extra[0] if extra else 'worker'}"
        shutil.rmtree(out, ignore_errors=True)  # a section is measured whole
        command = [sys.executable, "-m", "flexmoe", "deploy-local", "--out", str(out)]
        subprocess.run([*command, *DEPLOYMENT, *extra], check=True, stdout=subprocess.DEVNULL)
        rows[mode] = [
            {"wall_s": r.wall_s, "clients": [c.seconds for c in r.clients]}
            for r in read_rounds(out / ROUNDS_FILE)
        ]
    return rows


def section_rounds() -> dict:
    return simulate(["--clients", "2", *SMALL], OUT / "scratch" / "rounds")


def section_clients() -> dict:
    return {
        "4": simulate(["--clients", "4", *SMALL], OUT / "scratch" / "clients-4"),
        "100": simulate(
            ["--clients", "100", "--fraction-train", "0.1", *SMALL], OUT / "scratch" / "clients-100"
        ),
    }


SERVER_CLIENTS = (4, 10, 50)


def section_server() -> dict:
    """Peak memory (tracemalloc: Python and numpy allocations) of the server taking in one round
    of fedavg-full replies as they arrive, folded into a running sum (now) and all kept for
    Flower's FedAvg (before), at 4, 10 and 50 clients: tiny both ways, smol-moe folded only (its
    50 kept replies would need 27 GB here). Each reply is built as it arrives, as a pull hands
    it over, and its numbers are random (the sizes are what counts)."""
    import tracemalloc

    from flwr.supercore.task_identity import TaskIdentity

    from flexmoe.federated.aggregation import RoundUpdates
    from flexmoe.federated.federation import aggregate
    from flexmoe.federated.strategies import make_strategy

    # messages are stamped with their run and node, which a Flower runtime sets
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    rows: dict = {}
    for name, ways in (("tiny", ("folded", "kept")), ("smol-moe", ("folded",))):
        config = Settings.of(model=name, method="fedavg-full", max_train=300)
        shapes = {
            k: a.numpy().shape for k, a in initial_arrays(config, get_method("fedavg-full")).items()
        }
        current = ArrayRecord(
            {k: Array(np.zeros(shape, np.float32)) for k, shape in shapes.items()}
        )
        rows[name] = {"model_bytes": 4 * sum(math.prod(s) for s in shapes.values())}
        for way in ways:
            for clients in SERVER_CLIENTS:
                strategy = make_strategy(config.updated({"clients": clients}))
                tracemalloc.start()
                updates = RoundUpdates(current, 300, {0: 0}, keep_all=way == "kept")
                for client in range(clients):
                    updates.add(random_reply(client, shapes))
                aggregate(strategy, 1, updates.for_strategy())
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                del updates
                rows[name][f"{way} {clients}"] = peak
    return rows


def random_reply(client: int, shapes: dict) -> Message:
    """A fedavg-full train reply of ``client`` as the server receives it."""
    generator = np.random.default_rng(client)
    shared = {k: generator.standard_normal(shape, np.float32) for k, shape in shapes.items()}
    reply = TrainReply(client, 100, train_loss=1.0, lr=1e-4, proximal_mu=0.0, shared=shared)
    request = Message(RecordDict(), dst_node_id=0, message_type="train")
    return Message(reply.to_content(), reply_to=request)


SECTIONS = {
    "speed": section_speed,
    "padding": section_padding,
    "micro-batches": section_micro_batches,
    "uplink": section_uplink,
    "grafting": section_grafting,
    "budget": section_budget,
    "steps": section_steps,
    "latency": section_latency,
    "overhead": section_overhead,
    "deployment": section_deployment,
    "rounds": section_rounds,
    "clients": section_clients,
    "server": section_server,
}


Row = tuple[str, float, str, str]  # what, ratio, goal, the numbers behind it


def ratio(what: str, top: float, bottom: float, goal: str, side: str, note: str = "") -> Row:
    """A row for ``top / bottom``, each side shown with the format ``side``."""
    numbers = f"{side.format(top)} / {side.format(bottom)}" + (f", {note}" if note else "")
    return what, top / bottom, goal, numbers


def ratios(results: dict) -> list[Row]:
    """Every ratio measured, in the order of the sections."""
    rows = []
    rows += speed_rows(results.get("speed", {}))
    for split, row in results.get("padding", {}).items():
        what = f"real / padded tokens of a Dolly benchmark cell's steps, {split}"
        rows.append(ratio(what, row["real_tokens"], row["padded_tokens"], "report", "{:,}"))
    rows += micro_batch_rows(results.get("micro-batches", {}))
    for name, row in results.get("uplink", {}).items():
        goal = "<= 0.05" if name == "tiny" else "<= 0.01"
        what = f"FLEx / fedavg-full uplink, {name}"
        rows.append(ratio(what, row["flex"], row["fedavg-full"], goal, "{:,} B"))
    for name, row in results.get("grafting", {}).items():
        what, tokens = f"grafting / one forward, {name}", f"{row['tokens']} tokens"
        scored = f"{row['budget']} of {tokens} scored" if "budget" in row else tokens
        rows.append(ratio(what, row["graft"], row["forward"], "<= 2", "{:.2f} s", scored))
        if "graft_all" in row:
            what = f"grafting scoring every token / one forward, {name}"
            rows.append(ratio(what, row["graft_all"], row["forward"], "-", "{:.2f} s", tokens))
    rows += budget_rows(results.get("budget", {}))
    for name, row in results.get("steps", {}).items():
        what = f"FLEx step / full fine-tuning step, {name}"
        rows.append(ratio(what, row["flex"], row["fedavg-full"], "<= 0.8", "{:.3f} s"))
    for name, row in results.get("latency", {}).items():
        what = f"personalised / base latency (r=1), {name}"
        milliseconds = 1e3 * row["personalised_s"], 1e3 * row["base_s"]
        rows.append(ratio(what, *milliseconds, "<= 1.15", "{:.1f} ms"))
    for mode, rounds in results.get("overhead", {}).items():
        later = rounds[1:]  # round 1 grafts: selection is compute, timed under restore
        overhead = sum(r["load"] + r["restore"] + r["save"] for r in later)
        compute = sum(r["compute"] for r in later)
        what = f"client overhead / compute, smol-moe, base {mode}"
        rows.append(ratio(what, overhead, compute, "<= 0.10", "{:.2f} s", ROUNDS_2_3))
    rows += deployment_rows(results.get("deployment", {}))
    if "rounds" in results:
        later = results["rounds"]["rounds"][1:]  # round 1 starts Ray and the clients
        wall, compute = sum(r["wall_s"] for r in later), sum(r["client_s"] for r in later)
        what = "round wall / clients' compute, 2 in parallel"
        rows.append(ratio(what, wall, compute, "<= 1.2", "{:.2f} s", ROUNDS_2_3))
    if "clients" in results:
        rows += clients_rows(results["clients"]["100"], results["clients"]["4"])
    rows += server_rows(results.get("server", {}))
    return rows


ROUNDS_2_3 = "rounds 2-3"


def server_rows(server: dict) -> list[Row]:
    """Server peak memory at 50 clients against 4, folded and kept, per model."""
    rows = []
    for name, row in server.items():
        for way in ("folded", "kept"):
            if f"{way} 4" in row:
                small, large = row[f"{way} 4"], row[f"{way} {SERVER_CLIENTS[-1]}"]
                what = f"server peak memory, 50 clients / 4, fedavg-full {name}, replies {way}"
                goal = "<= 1.1" if way == "folded" else "-"
                at_10, model = row[f"{way} 10"] / 1e9, row["model_bytes"] / 1e9
                note = f"{at_10:.2f} GB at 10; model {model:.2f} GB"
                rows.append(ratio(what, large / 1e9, small / 1e9, goal, "{:.2f} GB", note))
    return rows


def budget_rows(budget: dict) -> list[Row]:
    """Per budget, over categories, layers and draws: the share of choices equal to every
    token's, and how much worse by every token's criterion the others are on average."""
    rows = []
    for size in BUDGETS if budget else ():
        cells = [by_budget[str(size)] for by_budget in budget.values()]
        same = statistics.fmean(c["same_expert"] for c in cells)
        regret = statistics.fmean(c["mean_regret"] for c in cells)
        worst = max(c["max_regret"] for c in cells)
        what = f"same expert as scoring every token, smol-moe, budget {size}"
        note = (
            f"criterion {100 * regret:.2f}% above the best on average, {100 * worst:.1f}% at worst"
        )
        rows.append((what, same, "report", note))
    return rows


def speed_rows(speed: dict) -> list[Row]:
    """Each setup's step and answer time against the first setup's (transformers' default)."""
    rows = []
    for kind, key, noun in (("steps", "step_s", "step"), ("generation", "s_per_example", "answer")):
        (first, reference), *others = speed[kind].items() if speed else [(None, None)]
        for name, row in others:
            note = f"loss {row['first_loss']:.4f}" if "first_loss" in row else "per example"
            what = f"smol-moe {noun}, {name} / {first}"
            rows.append(ratio(what, row[key], reference[key], "pick the faster", "{:.2f} s", note))
    return rows


def micro_batch_rows(measured: dict) -> list[Row]:
    """A step one example at a time against the whole batch, summed over the same batches."""
    if not measured:
        return []
    whole, micro = measured["whole batch"], measured["micro-batch-size 1"]
    real = measured["real_tokens"] / measured["padded_tokens"]
    what = "smol-moe step, micro-batch-size 1 / whole batch, Dolly pathological"
    note = f"{measured['steps']} steps, {real:.0%} of padded tokens real"
    return [ratio(what, micro, whole, "< 1", "{:.1f} s", note)]


def deployment_rows(deployed: dict) -> list[Row]:
    rows = []
    for mode, rounds in deployed.items():
        later = rounds[1:]
        wall = sum(r["wall_s"] for r in later)
        phases = {
            phase: sum(max(c.get(phase, 0.0) for c in r["clients"]) for r in later)
            for phase in ("startup", "load", "restore", "compute", "save")
        }
        overhead = phases["load"] + phases["restore"] + phases["save"]
        rows.append(
            (
                f"deployed client overhead / compute, smol-moe, {mode}",
                (overhead + phases["startup"]) / phases["compute"],
                "<= 0.10",
                f"({phases['startup']:.1f} s process start + {overhead:.1f} s load, restore, "
                f"save) / {phases['compute']:.1f} s, {ROUNDS_2_3}",
            )
        )
        what = f"deployed round wall / longest client's compute, smol-moe, {mode}"
        rows.append(ratio(what, wall, phases["compute"], "<= 1.2", "{:.1f} s", ROUNDS_2_3))
    if len(deployed) == 2:
        walls = [sum(r["wall_s"] for r in rounds[1:]) for rounds in deployed.values()]
        what = "deployed round wall, node worker / a process per message"
        rows.append(ratio(what, *walls, "below 1", "{:.1f} s", ROUNDS_2_3))
    return rows


def clients_rows(large: dict, small: dict) -> list[Row]:
    peaks = large["peak_bytes"] / 1e9, small["peak_bytes"] / 1e9
    rows = [ratio("peak memory, 100 clients / 4", *peaks, "<= 1.3", "{:.2f} GB")]
    compute = [
        statistics.fmean(c["compute"] for r in run["rounds"][1:] for c in r["seconds"])
        for run in (large, small)
    ]
    what = "compute per sampled client, 100 clients / 4"
    rows.append(ratio(what, *compute, "about 1", "{:.2f} s", ROUNDS_2_3))
    for label, run in (("100 clients, 10 sampled", large), ("4 clients", small)):
        later = run["rounds"][1:]
        wall = sum(r["wall_s"] for r in later)
        work = sum(work_seconds(c) for r in later for c in r["seconds"]) / PROCESSES
        what = f"round wall / sampled clients' work per process, {label}"
        rows.append(ratio(what, wall, work, "about 1", "{:.1f} s", ROUNDS_2_3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated sections (default: all)")
    parser.add_argument("--force", action="store_true", help="measure finished sections again")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    for name in chosen:
        path = OUT / f"{name}.json"
        if path.is_file() and not args.force:
            continue
        print(f"measuring {name} ...", flush=True)
        started = time.perf_counter()
        result = SECTIONS[name]()
        path.write_text(json.dumps(result, indent=1))
        print(f"  {name} done in {time.perf_counter() - started:.0f} s", flush=True)
    results = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    lines = [f"{'ratio':<66} {'value':>8}  {'goal':<16} numbers"]
    for what, value, goal, numbers in ratios(results):
        lines.append(f"{what:<66} {value:>8.4g}  {goal:<16} {numbers}")
    text = "\n".join(lines)
    (OUT / "summary.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
