"""The server side of a run: rounds, checkpoints, communication accounting, final evaluation.

The server holds only shared parameters. After every round it writes them, the strategy's state,
the round number, the per-round history and the random state under ``OUT/checkpoints`` and
``OUT/checkpoint.json`` (each file atomically, the JSON last), so a run can be resumed.
"""

from __future__ import annotations

import random
import secrets
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from flexmoe.errors import FlexMoEError
from flexmoe.federated.aggregation import RoundUpdates, arriving_replies, to_the_millisecond
from flexmoe.federated.protocol import EvaluateReply, RoundInstructions
from flexmoe.federated.records import in_wire_dtype, state_to_arrays, wire_bytes
from flexmoe.federated.run import Run, python_random_state
from flexmoe.federated.strategies import accountant_of, averages, strategy_state
from flexmoe.flex.model import initial_shared_state
from flexmoe.io import atomic_write
from flexmoe.methods import Method
from flexmoe.results import (
    CHECKPOINT_DIR,
    CLIENTS_DIR,
    Checkpoint,
    ClientResult,
    RoundRecord,
    RunResults,
    saved_arrays,
    write_checkpoint,
    write_results,
    write_rounds,
)
from flexmoe.settings import Settings

KEEP_CHECKPOINTS = 2


def run_federation(grid: Grid, run: Run, progress: bool = True) -> RunResults:
    """Run ``run``'s rounds on ``grid``, evaluate, and write the results to its folder.

    The caller holds the folder (``folder_lock``) and resolved the run in it (``resolve_run``):
    a resumed run continues from its checkpoint, and the clients ``run.regraft`` names start
    afresh in its next round; the results record them.
    """
    out, settings, strategy = run.out, run.settings, run.strategy
    remove_temporary_files(out)
    state, arrays = start_or_resume(run)
    state.regrafted.update({str(client): state.round + 1 for client in run.regraft})
    wait_for_clients(grid, settings.federation.clients)
    session_started, wall_before = time.perf_counter(), state.wall_s
    last, every = settings.federation.rounds, settings.evaluation.eval_every
    for round_ in tqdm(
        range(state.round + 1, last + 1), desc=f"{settings.method} rounds", disable=not progress
    ):
        arrays, record = train_round(grid, strategy, run, arrays, state, round_)
        if every and round_ % every == 0 and round_ < last:
            scores = evaluate_clients(grid, strategy, arrays, run, state.run_id, round_)
            record.mean_rouge_l = statistics.fmean(c.rouge_l for c in scores)
            record.client_rouge_l = {str(c.client_id): c.rouge_l for c in scores}
        state.history.append(record)
        state.round, state.random_state = round_, _random_state()
        state.wall_s = wall_before + time.perf_counter() - session_started
        save_checkpoint(out, state, arrays, strategy)
    if progress:
        extra = " and measure knowledge, routing and FLOPs" * settings.evaluation.diagnostics
        clients = settings.federation.clients
        tqdm.write(f"final evaluation: {clients} clients answer their test examples{extra}")
    evaluation = evaluate_clients(
        grid, strategy, arrays, run, state.run_id, state.round, final=True
    )
    state.wall_s = wall_before + time.perf_counter() - session_started
    results = RunResults.summarise(
        state.config, state.history, evaluation, state.wall_s, state.regrafted
    )
    write_results(out, results)
    return results


def train_round(
    grid: Grid,
    strategy: Strategy,
    run: Run,
    arrays: ArrayRecord,
    state: Checkpoint,
    round_: int,
) -> tuple[ArrayRecord, RoundRecord]:
    """One round of training: the aggregate of the clients' valid updates, and its record.

    A round of its own so that its replies (a full model each, for ``fedavg-full``) are freed
    when it ends, not held until the next round's have arrived.
    """
    started = time.perf_counter()
    random.seed(run.settings.seed * 1_000 + round_)  # node sampling, when fraction-train < 1
    request = round_instructions(run.out, state.run_id, round_).to_record()
    messages = list(strategy.configure_train(round_, arrays, request, grid))
    federated = run.method.federated
    updates = RoundUpdates(
        arrays if federated else None,  # what is not aggregated is not checked
        run.settings.data.max_train,
        {m.metadata.dst_node_id: wire_bytes(m.content) for m in messages},
        keep_all=not (federated and averages(strategy)),
    )
    for reply in arriving_replies(grid, messages, run.settings.federation.reply_timeout):
        updates.add(reply)
    del messages
    if federated:
        check_enough(round_, updates, run.settings)
    record = _round_record(round_, updates, started)
    if federated:
        arrays = aggregate(strategy, round_, updates.for_strategy())
        record.dp_epsilon, state.privacy_state = privacy_spent(strategy)
    return arrays, record


def start_or_resume(run: Run) -> tuple[Checkpoint, ArrayRecord]:
    """The saved state of a resumed run (its strategy's put back by ``resolve_run``), or a new
    run's, saved at once as round 0."""
    if run.saved is not None:
        # the same settings, but for RESUMABLE_SETTINGS
        state = replace(run.saved.state, config=run.settings.to_record())
        if state.random_state is not None:  # node sampling goes on where it stopped
            random.setstate(python_random_state(state.random_state))
        # in_wire_dtype: FedAdam's checkpoints of earlier versions hold float64
        arrays = ArrayRecord({k: Array(v) for k, v in run.saved.shared.items()})
        return state, in_wire_dtype(arrays)
    state = Checkpoint(run_id=secrets.token_hex(8), config=run.settings.to_record())
    arrays = initial_arrays(run.settings, run.method)
    save_checkpoint(run.out, state, arrays, run.strategy)
    return state, arrays


def remove_temporary_files(out: Path) -> None:
    """Remove what a write killed midway left (the lock held means no write is under way)."""
    for pattern in (".*.tmp", f"{CHECKPOINT_DIR}/.*.tmp"):
        for leftover in out.glob(pattern):
            leftover.unlink()


def check_enough(round_: int, updates: RoundUpdates, settings: Settings) -> None:
    """Fewer valid updates than ``min-updates`` (0: every reply) fail the run."""
    replies = updates.accepted + len(updates.rejected)
    needed = settings.federation.min_updates or replies
    if updates.accepted < needed:
        reasons = "; ".join(f"client {r.client_id}: {r.reason}" for r in updates.rejected)
        raise FlexMoEError(
            f"round {round_}: {updates.accepted} of {replies} updates are valid and the round "
            f"needs {needed} (min-updates); rejected: {reasons}"
        )


def aggregate(strategy: Strategy, round_: int, replies: list[Message]) -> ArrayRecord:
    """The strategy's aggregate of checked updates in the wire dtype (Flower's FedAdam returns
    float64, and the next round's updates are checked against it), checked to be finite."""
    arrays, _ = strategy.aggregate_train(round_, replies)
    if arrays is None:  # Flower's strategies return nothing rather than raise
        raise FlexMoEError(f"round {round_}: the strategy aggregated nothing from the updates")
    arrays = in_wire_dtype(arrays)
    check_finite(arrays, "the aggregated parameters", round_)
    return arrays


def privacy_spent(strategy: Strategy) -> tuple[float | None, dict | None]:
    """``(epsilon so far, the accountant's state)`` of a private run with noise, else Nones."""
    accountant = accountant_of(strategy)
    if accountant is None:
        return None, None
    return accountant.get_privacy_spent().epsilon, accountant.state_dict()


def wait_for_clients(grid: Grid, count: int, timeout_s: float = 600.0) -> None:
    """Block until ``count`` SuperNodes are connected, so every round sees all of them."""
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            connected = len(list(grid.get_node_ids()))
            raise FlexMoEError(
                f"only {connected} of {count} clients connected within {timeout_s:.0f} s; "
                "start one SuperNode per client"
            )
        time.sleep(0.5)


def initial_arrays(settings: Settings, method: Method) -> ArrayRecord:
    """The global shared parameters before round 1 (none for methods that do not federate)."""
    if not method.federated:
        return ArrayRecord()
    torch.manual_seed(settings.seed)
    return state_to_arrays(initial_shared_state(settings.model, method.shared))


def evaluate_clients(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    run: Run,
    run_id: str,
    round_: int,
    final: bool = False,
) -> list[ClientResult]:
    """Every client scores the model it would use after ``round_``, on its own test split; the
    ``final`` evaluation also measures the diagnostics, if the run asks for them."""
    detailed = final and run.settings.evaluation.diagnostics
    request = round_instructions(run.out, run_id, round_, detailed).to_record()
    messages = strategy.configure_evaluate(round_, arrays, request, grid)
    clients = []
    timeout = run.settings.federation.reply_timeout
    for message in arriving_replies(grid, list(messages), timeout):
        reply = EvaluateReply.from_message(message)
        client = ClientResult(
            client_id=reply.client_id,
            categories=reply.categories,
            test_ids=reply.test_ids,
            n_train=reply.n_train,
            n_test=reply.n_test,
            rouge_l=reply.rouge_l,
            test_loss=reply.test_loss,
            eval_seconds=to_the_millisecond(reply.seconds),
        )
        clients.append(client.with_diagnostics(reply.diagnostics))
    return sorted(clients, key=lambda c: c.client_id)


def save_checkpoint(out: Path, state: Checkpoint, arrays: ArrayRecord, strategy: Strategy) -> None:
    """The arrays of this round first, then rounds.json and checkpoint.json naming them."""
    shared = {k: np.ascontiguousarray(a.numpy()) for k, a in arrays.items()}
    atomic_write(state.arrays_path(out, "shared"), lambda p: save_file(shared, str(p)))
    server = strategy_state(strategy)
    atomic_write(state.arrays_path(out, "strategy"), lambda p: save_file(server, str(p)))
    write_rounds(out, state.history)
    write_checkpoint(out, state)
    for kind in ("shared", "strategy"):  # the newest KEEP_CHECKPOINTS rounds of each
        for round_, old in list(saved_arrays(out, kind).items())[:-KEEP_CHECKPOINTS]:
            if round_ != state.round:
                old.unlink()


def round_instructions(
    out: Path, run_id: str, round_: int, detailed: bool = False
) -> RoundInstructions:
    """What every client is asked in ``round_`` (the strategy adds its own values).

    Personal state is kept under the run's id, not the folder's name, so a run folder that is
    copied or moved resumes with its own clients' state.
    """
    return RoundInstructions(
        server_round=round_,
        run_key=run_id,
        state_root=str((out / CLIENTS_DIR).resolve()),
        detailed=detailed,
    )


def _round_record(round_: int, updates: RoundUpdates, started: float) -> RoundRecord:
    if not updates.clients:
        reasons = "; ".join(r.reason for r in updates.rejected) or "no reply"
        raise FlexMoEError(f"round {round_}: no client's reply could be read ({reasons})")
    clients = sorted(updates.clients, key=lambda c: c.client_id)
    return RoundRecord(
        round=round_,
        lr=updates.lrs[0],
        mean_train_loss=statistics.fmean(c.train_loss for c in clients),
        bytes_up=sum(c.bytes_up for c in clients),
        bytes_down=sum(c.bytes_down for c in clients),
        wall_s=round(time.perf_counter() - started, 2),
        clients=clients,
        rejected=updates.rejected,
    )


def check_finite(arrays: ArrayRecord, what: str, round_: int) -> None:
    """Refuse to aggregate, or keep, parameters that are not finite."""
    broken = [name for name, array in arrays.items() if not np.isfinite(array.numpy()).all()]
    if broken:
        raise FlexMoEError(
            f"round {round_}: {what} holds non-finite values ({len(broken)} arrays, e.g. "
            f"{broken[0]}); nothing was aggregated or saved"
        )


def _random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
