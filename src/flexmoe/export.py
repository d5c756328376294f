"""A trained client's model, taken out of a run: ``flexmoe export``.

A federation ends with the global shared parameters in the run's checkpoints and each client's
personal state on its node (``OUT/clients/<run id>/client-<i>/round-NNNN`` for ``flexmoe run``,
``DIR/supernodes/node-<i>/<run id>/client-<i>/...`` for ``flexmoe deploy-local``). Client i's model
after round N is what it was evaluated with: its latest personal state up to N with the global
shared parameters of round N (its own, for ``local``). The export writes it as one folder that
``FlexModel.from_pretrained`` loads, and, where the shared parameters are LoRA, the client's
LoRA as a plain PEFT adapter beside it (``adapter_config.json`` + ``adapter_model.safetensors``),
which ``peft.PeftModel.from_pretrained`` and vLLM's multi-LoRA serving load without flexmoe;
and, where it can be exact, the whole model as a plain transformers checkpoint
(``flexmoe.flex.merge``) in ``merged/`` (not beside the PEFT files: transformers would read
those as an adapter to load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from flexmoe.client.state import StateStore
from flexmoe.errors import FlexMoEError
from flexmoe.federated.protocol import client_state_dir
from flexmoe.federated.run import read_run_state
from flexmoe.flex.merge import merge_problem, merged_model
from flexmoe.flex.model import FlexModel
from flexmoe.flex.roles import LORA_ADAPTER, Role
from flexmoe.hardware import Placement
from flexmoe.io import atomic_write, atomic_write_text
from flexmoe.models.loading import load_model, resolve_model_path
from flexmoe.results import CLIENTS_DIR, saved_arrays

EXPORT_FILE = "export.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MERGED = "merged"  # the plain transformers checkpoint, beside (not among) the adapter files


@dataclass(frozen=True)
class Export:
    """What was exported, recorded in ``export.json``."""

    run_id: str
    round: int
    client: int
    method: str
    model: str
    personal_round: int  # the round of the client's latest state up to ``round``
    peft: bool  # a PEFT adapter was written (the shared parameters are LoRA)


def export_client(
    run_dir: Path,
    client: int,
    out: Path,
    round_: int | None = None,
    state_root: Path | None = None,
    placement: Placement | None = None,
    merge: bool = False,
) -> Export:
    """Write client ``client``'s model after ``round_`` (default: the run's last) to ``out``;
    with ``merge``, also as a plain transformers checkpoint in ``out/merged`` (refused, before
    anything is written, where it cannot be exact)."""
    state, settings = read_run_state(run_dir)  # the arrays of the round asked for alone
    run_id = state.run_id
    clients = settings.federation.clients
    if not 0 <= client < clients:
        raise FlexMoEError(f"{run_dir} ran clients 0 to {clients - 1}; there is no client {client}")
    last = state.round
    round_ = last if round_ is None else round_
    if not 1 <= round_ <= last:
        raise FlexMoEError(f"{run_dir} ran rounds 1 to {last}; there is no round {round_}")
    shared = _shared_of_round(run_dir, round_, last) if settings.chosen_method().federated else {}
    store = StateStore(_client_folder(run_dir, run_id, client, state_root))
    personal = store.latest(before=round_ + 1)
    if personal is None:
        raise FlexMoEError(
            f"client {client} of {run_dir} kept no state up to round {round_} in {store.root}; "
            "give --state-dir, the node folder that holds it"
        )
    base, tokenizer = load_model(settings.model, placement or Placement.resolve("cpu", "float32"))
    model = FlexModel.from_pretrained(base, personal)
    if shared:
        model.load_state_of(Role.SHARED, shared)
    if merge and (problem := merge_problem(model)):
        raise FlexMoEError(f"cannot merge client {client}'s model exactly: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, include_shared=True)
    peft = model.config.shared.mode == "lora"
    if peft:
        write_peft_adapter(model, out, str(resolve_model_path(settings.model)))
    if merge:
        merged_model(model).save_pretrained(out / MERGED)
        tokenizer.save_pretrained(out / MERGED)
    record = Export(
        run_id=run_id,
        round=round_,
        client=client,
        method=settings.method,
        model=settings.model,
        personal_round=int(personal.name[6:]),
        peft=peft,
    )
    atomic_write_text(out / EXPORT_FILE, json.dumps(record.__dict__, indent=2))
    return record


def _shared_of_round(run_dir: Path, round_: int, last: int) -> dict[str, torch.Tensor]:
    """The global shared parameters the server saved after ``round_``."""
    saved = saved_arrays(run_dir, "shared")
    if round_ not in saved:
        kept = ", ".join(str(r) for r in saved)
        rounds = "rounds" if len(saved) > 1 else "round"
        raise FlexMoEError(
            f"{run_dir} keeps the shared parameters of {rounds} {kept} only, not of round "
            f"{round_} (its last is {last}); give one of those with --round"
        )
    return load_file(saved[round_])


def _client_folder(run_dir: Path, run_id: str, client: int, state_root: Path | None) -> Path:
    """Where client ``client`` keeps its state: under ``state_root`` if given, else the run's
    ``clients`` folder, else a ``deploy-local`` SuperNode's folder."""
    if state_root is not None:
        return client_state_dir(state_root, run_id, client)
    local = client_state_dir(run_dir / CLIENTS_DIR, run_id, client)
    deployed = client_state_dir(run_dir / "supernodes" / f"node-{client}", run_id, client)
    return deployed if not local.is_dir() and deployed.is_dir() else local


def write_peft_adapter(model: FlexModel, out: Path, base_name: str) -> None:
    """The model's LoRA (shared, and personal B for FedSA-LoRA) as a plain PEFT adapter."""
    shared = model.config.shared
    weights = {
        _peft_name(name): p.detach().cpu().contiguous()
        for name, p in model.model.named_parameters()
        if ".lora_" in name
    }
    config = LoraConfig(
        r=shared.lora_r,
        lora_alpha=shared.lora_alpha,
        lora_dropout=shared.lora_dropout,
        target_modules=sorted(shared.target_modules),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
        inference_mode=True,
    )
    atomic_write_text(out / PEFT_CONFIG, json.dumps(config.to_dict(), indent=2, default=list))
    atomic_write(out / PEFT_WEIGHTS, lambda scratch: save_file(weights, str(scratch)))


def _peft_name(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A.default.weight`` as PEFT saves it:
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return "base_model.model." + name.replace(f".{LORA_ADAPTER}.", ".")
