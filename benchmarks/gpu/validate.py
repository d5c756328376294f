"""One short check of flexmoe on a GPU at the paper's scale, writing one JSON summary.

    python benchmarks/gpu/validate.py [--cpu] [--out FILE]

On CUDA (sized to run in at most 7 minutes on one H100-class GPU; not yet run on one, as no GPU
has been lent to this project so far): Qwen1.5-MoE-A2.7B is built from the shipped
config with random weights directly on the GPU in bfloat16 (28.6 GB, nothing downloaded); FLEx
grafts on 32 batches of 8 x 256 tokens; 10 FLEx and 10 FedAvg local steps run in mixed precision,
with and without gradient checkpointing; an adapter is saved, taken off and loaded again, the base
checked untouched; batched greedy generation is timed against one prompt at a time; and one client
round (train and evaluate on the packaged Dolly-15k) goes through the client worker on a 4-layer
copy saved to disk. Each step records its seconds and the GPU's peak memory, and the summary
names the device, the experts implementation in use and the library versions.

``--cpu`` runs the same steps on a small random config of the same architecture in float32, in
seconds; CI runs it (tests/benchmarks/test_gpu_validate.py). Nothing beyond what ``make install``
installs is needed: torch (a CUDA build on the GPU machine), transformers, peft, flwr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from flexmoe.flex import FlexConfig, FlexModel
from flexmoe.hardware import Placement, synchronize
from flexmoe.methods import get_method
from flexmoe.models.loading import load_config, load_tokenizer
from flexmoe.training import train_steps

OUT = Path(__file__).resolve().parents[1] / "results" / "perf" / "gpu-validate.json"
PAPER_MODEL = "qwen1.5-moe-a2.7b"
SMALL = {  # --cpu: the paper's architecture at a size CI runs in seconds
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 512,
}  # fmt: skip


@dataclass(frozen=True)
class Scale:
    """What one mode builds and runs."""

    placement: Placement
    config: PretrainedConfig
    batches: int  # grafting batches
    batch_size: int
    seq_len: int
    steps: int
    worker_layers: int


def resized(config: PretrainedConfig, **changes: int) -> PretrainedConfig:
    """A copy of ``config`` with ``changes``, its per-layer lists cut to the layers it keeps."""
    config = copy.deepcopy(config)
    config.update(changes)
    layers = config.num_hidden_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    return config


def scale(cpu: bool) -> Scale:
    config = load_config(PAPER_MODEL)
    if cpu:
        config = resized(config, **SMALL)
        return Scale(Placement.resolve("cpu", "float32"), config, 4, 2, 32, 3, 2)
    if not torch.cuda.is_available():
        raise SystemExit("validate.py: no CUDA device here; run with --cpu to check the script")
    return Scale(Placement.resolve("cuda", "bfloat16"), config, 32, 8, 256, 10, 4)


class Measured:
    """Seconds and peak device memory of named steps, and what each found."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: dict[str, dict] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict]:
        found: dict = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronize(self.device)
        started = time.perf_counter()
        yield found
        synchronize(self.device)
        found["seconds"] = round(time.perf_counter() - started, 3)
        if self.device.type == "cuda":
            found["peak_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2)
        self.steps[name] = found
        print(f"{name}: {found}", flush=True)


def random_batches(scale: Scale, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shape = (scale.batch_size, scale.seq_len)
    batches = []
    for _ in range(count):
        ids = torch.randint(10, scale.config.vocab_size, shape, generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        batches.append({k: v.to(scale.placement.device) for k, v in batch.items()})
    return batches


def weights_digest(model: torch.nn.Module) -> float:
    """A sum over a strided sample of every weight: moves if any weight moves."""
    with torch.no_grad():
        return float(
            sum(p.detach().flatten()[::997].double().sum().cpu() for p in model.parameters())
        )


def build(scale: Scale, run: Measured) -> torch.nn.Module:
    with run.step("build") as found, torch.device(scale.placement.device):
        model = AutoModelForCausalLM.from_config(scale.config, dtype=scale.placement.dtype)
        found["parameters"] = sum(p.numel() for p in model.parameters())
        found["experts_implementation"] = model.config._experts_implementation
    return model.eval().requires_grad_(False)


STEP_VARIANTS = {  # label: (gradient checkpointing, micro-batch size)
    "": (False, 0),
    ", gradient checkpointing": (True, 0),
    ", one example a forward pass": (False, 1),
}


def local_steps(model: FlexModel, scale: Scale, batches: list, run: Measured, name: str) -> None:
    for variant, (checkpointing, micro_batch_size) in STEP_VARIANTS.items():
        with scale.placement.autocast(), run.step(f"{name} steps{variant}") as found:
            # one batch again and again: its loss must fall, or the step is broken
            losses = train_steps(
                model.model, itertools.repeat(batches[0]), scale.steps, 1e-3,
                gradient_checkpointing=checkpointing, micro_batch_size=micro_batch_size,
            )  # fmt: skip
            found["losses"] = [round(x, 4) for x in (losses[0], losses[-1])]


def adapters_round_trip(flex: FlexModel, pristine: float, run: Measured, folder: Path) -> None:
    with run.step("save, unload, load") as found:
        personal = flex.personal_state_dict()
        flex.save_pretrained(folder)
        base = flex.unload()
        found["base_untouched"] = weights_digest(base) == pristine
        again = FlexModel.from_pretrained(base, folder)
        reloaded = again.personal_state_dict()
        found["personal_state_equal"] = reloaded.keys() == personal.keys() and all(
            torch.equal(reloaded[k], personal[k]) for k in personal
        )
        again.unload()


def generation(base: torch.nn.Module, scale: Scale, run: Measured) -> None:
    prompts = [b["input_ids"][0, : 16 + 4 * i] for i, b in enumerate(random_batches(scale, 8, 9))]
    new = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": 0}
    with run.step("generate one at a time") as found, scale.placement.autocast():
        single = [base.generate(p[None], **new)[0, len(p) :] for p in prompts]
    with run.step("generate batched") as batched, scale.placement.autocast():
        width = max(len(p) for p in prompts)
        ids = torch.stack([torch.nn.functional.pad(p, (width - len(p), 0)) for p in prompts])
        mask = torch.stack(
            [(torch.arange(width, device=ids.device) >= width - len(p)).long() for p in prompts]
        )
        together = base.generate(input_ids=ids, attention_mask=mask, **new)[:, width:]
    same = sum(torch.equal(a, b[: len(a)]) for a, b in zip(single, together, strict=True))
    batched["same_answers_as_one_at_a_time"] = f"{same} of {len(prompts)}"
    batched["speedup"] = round(found["seconds"] / batched["seconds"], 2)


def worker_round(scale: Scale, run: Measured, folder: Path) -> None:
    """Train and evaluate one client of a FLEx run through the client worker, on a copy of the
    model with ``worker_layers`` layers and the bundled tiny model's tokenizer."""
    from flexmoe.client import ClientWorker
    from flexmoe.federated.federation import initial_arrays
    from flexmoe.federated.records import arrays_to_state
    from flexmoe.settings import Settings

    tokenizer = load_tokenizer("tiny")
    config = resized(scale.config, num_hidden_layers=scale.worker_layers, vocab_size=len(tokenizer))
    with torch.device(scale.placement.device):
        smaller = AutoModelForCausalLM.from_config(config, dtype=scale.placement.dtype)
    smaller.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    del smaller
    settings = Settings.of(
        model=str(folder / "model"), method="flex", clients=2, rounds=1, local_steps=2,
        batch_size=2, max_train=8, max_test=2, max_new_tokens=8,
        device=str(scale.placement.device), dtype=str(scale.placement.dtype).removeprefix("torch."),
    )  # fmt: skip
    shared = arrays_to_state(initial_arrays(settings, get_method("flex")))
    worker = ClientWorker(settings, 0, folder / "state")
    with run.step("client worker round") as found:
        trained = worker.train(1, shared)
        evaluation = worker.evaluate(1, trained.shared | shared)
        found["train_loss"] = round(trained.train_loss, 4)
        found["rouge_l"] = round(evaluation.rouge_l, 2)


def validate(cpu: bool) -> dict:
    chosen = scale(cpu)
    torch.manual_seed(0)
    run = Measured(chosen.placement.device)
    base = build(chosen, run)
    pristine = weights_digest(base)
    batches = random_batches(chosen, chosen.batches, 0)
    with run.step("graft") as found, chosen.placement.autocast():
        torch.manual_seed(0)
        flex, choices = FlexModel.graft(base, batches, FlexConfig())
        found["tokens"] = chosen.batches * chosen.batch_size * chosen.seq_len
        found["layers"] = len(choices)
    local_steps(flex, chosen, batches, run, "FLEx")
    with tempfile.TemporaryDirectory() as scratch:
        adapters_round_trip(flex, pristine, run, Path(scratch) / "adapter")
        fedavg = FlexModel(base, config=FlexConfig(shared=get_method("fedavg").shared))
        local_steps(fedavg, chosen, batches, run, "FedAvg")
        base = fedavg.unload()
        generation(base, chosen, run)
        del base, flex, fedavg
        worker_round(chosen, run, Path(scratch))
    return {
        "device": torch.cuda.get_device_name() if not cpu else platform.processor() or "cpu",
        "mode": "cpu" if cpu else "cuda",
        "model": PAPER_MODEL if not cpu else f"{PAPER_MODEL} architecture, small random config",
        "placement": str(chosen.placement),
        "versions": {n: metadata.version(n) for n in ("torch", "transformers", "peft", "flwr")},
        "steps": run.steps,
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="a small config on the CPU (CI)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    summary = validate(args.cpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"written to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
