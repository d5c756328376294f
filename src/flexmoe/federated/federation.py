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
from collections.abc import Iterable
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
from flexmoe.federated.protocol import EvaluateReply, RoundInstructions, TrainReply
from flexmoe.federated.records import in_wire_dtype, state_to_arrays, wire_bytes
from flexmoe.federated.run import Run, python_random_state
from flexmoe.federated.strategies import accountant_of, strategy_state
from flexmoe.federated.validation import screen_updates, sender
from flexmoe.flex.model import initial_shared_state
from flexmoe.io import atomic_write
from flexmoe.methods import Method
from flexmoe.results import (
    CHECKPOINT_DIR,
    CLIENTS_DIR,
    Checkpoint,
    ClientResult,
    ClientRound,
    RejectedUpdate,
    RoundRecord,
    RunResults,
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
    replies = _replies(grid, messages, run.settings.federation.reply_timeout)
    federated = run.method.federated
    valid, rejected = screen(round_, replies, arrays, run.settings) if federated else (replies, [])
    readable = [r for r in replies if sender(r) >= 0]  # a rejected update's bytes still count
    record = _round_record(round_, messages, readable, started)
    record.rejected = rejected
    if federated:
        arrays = aggregate(strategy, round_, valid)
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


def screen(
    round_: int, replies: list[Message], current: ArrayRecord, settings: Settings
) -> tuple[list[Message], list[RejectedUpdate]]:
    """The updates fit to aggregate with ``current`` (``flexmoe.federated.validation``) and the
    ones left out; fewer valid updates than ``min-updates`` (0: every reply) fail the run."""
    valid, rejected = screen_updates(replies, current, settings.data.max_train)
    needed = settings.federation.min_updates or len(replies)
    if len(valid) < needed:
        reasons = "; ".join(f"client {r.client_id}: {r.reason}" for r in rejected)
        raise FlexMoEError(
            f"round {round_}: {len(valid)} of {len(replies)} updates are valid and the round "
            f"needs {needed} (min-updates); rejected: {reasons}"
        )
    return valid, rejected


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
    for message in _replies(grid, list(messages), run.settings.federation.reply_timeout):
        reply = EvaluateReply.from_message(message)
        client = ClientResult(
            client_id=reply.client_id,
            categories=reply.categories,
            test_ids=reply.test_ids,
            n_train=reply.n_train,
            n_test=reply.n_test,
            rouge_l=reply.rouge_l,
            test_loss=reply.test_loss,
            eval_seconds=_to_the_millisecond(reply.seconds),
        )
        clients.append(client.with_diagnostics(reply.diagnostics))
    return sorted(clients, key=lambda c: c.client_id)


def save_checkpoint(out: Path, state: Checkpoint, arrays: ArrayRecord, strategy: Strategy) -> None:
    """The arrays of this round first, then rounds.json and checkpoint.json naming them."""
    folder = out / CHECKPOINT_DIR
    shared = {k: np.ascontiguousarray(a.numpy()) for k, a in arrays.items()}
    atomic_write(state.arrays_path(out, "shared"), lambda p: save_file(shared, str(p)))
    server = strategy_state(strategy)
    atomic_write(state.arrays_path(out, "strategy"), lambda p: save_file(server, str(p)))
    write_rounds(out, state.history)
    write_checkpoint(out, state)
    for old in sorted(folder.glob("*-round-*.safetensors"))[: -2 * KEEP_CHECKPOINTS]:
        if state.tag not in old.name:
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


def _replies(grid: Grid, messages: list[Message], timeout_s: float) -> list[Message]:
    """Every client's reply, waiting at most ``timeout_s`` (0: no limit); a client's error or a
    missing reply fails the run."""
    replies = list(grid.send_and_receive(messages, timeout=timeout_s or None))
    failed = [r for r in replies if r.has_error()]
    if failed:
        reason = failed[0].error.reason.strip().splitlines()
        raise FlexMoEError(f"a client failed: {reason[-1] if reason else 'no reason given'}")
    if len(replies) != len(messages):
        raise FlexMoEError(
            f"{len(messages) - len(replies)} of {len(messages)} clients did not reply within "
            f"{timeout_s:g} s (reply-timeout); resume the run with a longer one, or 0 to wait "
            "as long as Flower's messages live (flexmoe run --resume OUT --reply-timeout S; "
            "flwr run: --run-config 'reply-timeout=S')"
        )
    return replies


def _round_record(
    round_: int, messages: Iterable[Message], replies: list[Message], started: float
) -> RoundRecord:
    down = {m.metadata.dst_node_id: wire_bytes(m.content) for m in messages}
    clients, lrs = [], []
    for message in replies:
        reply = TrainReply.from_message(message)
        lrs.append(reply.lr)
        clients.append(
            ClientRound(
                client_id=reply.client_id,
                bytes_up=wire_bytes(message.content),
                bytes_down=down[message.metadata.src_node_id],
                train_loss=reply.train_loss,
                proximal_mu=reply.proximal_mu,
                seconds=_to_the_millisecond(reply.seconds),
            )
        )
    clients.sort(key=lambda c: c.client_id)
    return RoundRecord(
        round=round_,
        lr=lrs[0],
        mean_train_loss=statistics.fmean(c.train_loss for c in clients),
        bytes_up=sum(c.bytes_up for c in clients),
        bytes_down=sum(c.bytes_down for c in clients),
        wall_s=round(time.perf_counter() - started, 2),
        clients=clients,
    )


def check_finite(arrays: ArrayRecord, what: str, round_: int) -> None:
    """Refuse to aggregate, or keep, parameters that are not finite."""
    broken = [name for name, array in arrays.items() if not np.isfinite(array.numpy()).all()]
    if broken:
        raise FlexMoEError(
            f"round {round_}: {what} holds non-finite values ({len(broken)} arrays, e.g. "
            f"{broken[0]}); nothing was aggregated or saved"
        )


def _to_the_millisecond(seconds: dict[str, float]) -> dict[str, float]:
    return {phase: round(value, 3) for phase, value in seconds.items()}


def _random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
