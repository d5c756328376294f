"""The Flower ClientApp: a thin shell that turns messages into jobs on a ClientWorker.

In simulation the job runs in the app's own process (a Ray actor, reused from message to
message). A deployment starts a process per message, so there a SuperNode whose node config names
a ``worker-socket`` hands the job to its long-lived node worker (``flexmoe.federated.node_worker``)
that keeps the model loaded.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from flexmoe.errors import FlexMoEError
from flexmoe.federated.node_worker import Job, submit
from flexmoe.federated.protocol import (
    CLIPPING_NORM,
    CONFIG,
    DEPLOYED,
    PARTITION_ID,
    SERVER_ROUND,
    SIMULATED,
    STARTUP,
    EvaluateReply,
    NodeConfig,
    NodeLimits,
    RoundInstructions,
    State,
    TrainReply,
    arrays_of,
    client_state_dir,
    split_run_config,
)
from flexmoe.federated.records import WireState, numpy_to_state, on_the_wire
from flexmoe.placement import cuda_index
from flexmoe.settings import Settings

if TYPE_CHECKING:  # torch and transformers only where jobs run (``run_job``)
    from flexmoe.client import ClientWorker

RUN_KEY_FORM = re.compile(r"[A-Za-z0-9_-]{1,64}")


def make_client_app(settings: Settings | None = None) -> ClientApp:
    """A ClientApp running ``settings``, or the run config's settings when none are given."""
    app = ClientApp()

    @app.train(mods=[clip_when_private])
    def train(msg: Message, context: Context) -> Message:
        return reply("train", msg, context, settings)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return reply("evaluate", msg, context, settings)

    return app


def reply(kind: str, msg: Message, context: Context, settings: Settings | None) -> Message:
    """The reply to ``msg``: the job's result, or an error of one line naming the client, the
    round and what went wrong, its traceback written to a log file on this node (a raised
    exception would print the traceback in every runtime's log on its way to the server)."""
    try:
        return Message(answer(kind, msg, context, settings).to_content(), reply_to=msg)
    except Exception as error:
        log = _log_traceback()
        client = context.node_config.get(PARTITION_ID, "?")
        round_ = msg.content.config_records.get(CONFIG, {}).get(SERVER_ROUND, "?")
        if isinstance(error, OSError) and error.filename:
            error = f"{error.filename}: {error.strerror or error}"
        reason = f"client {client}, round {round_}: {error} (traceback in {log})"
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


def _log_traceback() -> str:
    """The exception being handled, with its traceback, in a new owner-only log file."""
    fd, path = tempfile.mkstemp(prefix="flexmoe-client-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as log:
        log.write(traceback.format_exc())
    return path


def clip_when_private(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixed-clipping mod when the server asks for clipping (a private run): the
    reply's update, its shared parameters minus the global ones, is clipped to that L2 norm."""
    if CLIPPING_NORM in msg.content.config_records.get(CONFIG, {}):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def actor_device(device: str) -> str:
    """The device a simulated client names inside its Ray actor: the one GPU Ray gave it is
    ``cuda`` (Ray renumbers it 0), whatever ``cuda:N`` the run asked for."""
    return "cuda" if cuda_index(device) is not None else device


def job_of(
    kind: str, msg: Message, context: Context, node: NodeConfig, settings: Settings | None
) -> Job:
    """What ``msg`` asks of this node, with the run's settings and the node's own."""
    threads = node.threads if settings is None else simulated_threads(settings)
    if settings is None:
        values, _ = split_run_config(dict(context.run_config))
        settings = Settings().updated(values)
    else:  # a simulated client, in a Ray actor that sees only the GPU Ray gave it
        settings = settings.updated({"device": actor_device(settings.device)})
    if node.device:
        settings = settings.updated({"device": node.device})
    clients = settings.federation.clients
    partitions = node.num_partitions or clients
    if partitions != clients:
        raise FlexMoEError(
            f"{partitions} SuperNodes serve a run configured for {clients} clients; "
            "set clients to the number of SuperNodes"
        )
    check_limits(settings, node.limits)
    instructions = RoundInstructions.from_message(msg)
    if not RUN_KEY_FORM.fullmatch(instructions.run_key):
        raise FlexMoEError(
            f"refused a run key {instructions.run_key!r}: it names a folder under this node's "
            "state-dir, so it must be a plain name (letters, digits, '-' and '_')"
        )
    if not node.limits.share_diagnostics:
        instructions = replace(instructions, detailed=False)
    root = node.state_dir or instructions.state_root
    state_dir = client_state_dir(Path(root), instructions.run_key, node.partition_id)
    return Job(
        kind,
        settings,
        node.partition_id,
        state_dir,
        threads,
        instructions,
        arrays_of(msg),
        node.data,
    )


def simulated_threads(settings: Settings) -> int:
    """Torch threads of a simulated client process: one, or on the CPU every core for a method
    that trains the base weights, whose clients run one at a time (``client_resources``)."""
    from flexmoe.hardware import Placement

    on_cpu = Placement.resolve(settings.device, settings.dtype).device.type != "cuda"
    whole_model = settings.chosen_method().shared.trains_base_weights
    return (os.cpu_count() or 1) if on_cpu and whole_model else 1


def check_limits(settings: Settings, limits: NodeLimits) -> None:
    """Refuse a run that asks this node for less than its limits allow."""
    for setting, asked, least in (
        ("batch-size", settings.train.batch_size, limits.min_batch_size),
        ("max-test", settings.data.max_test, limits.min_test_size),
    ):
        if asked < least:
            raise FlexMoEError(
                f"this node takes {setting} of at least {least} (its --node-config), and the "
                f"run asks for {asked}; run with {setting}={least} or more"
            )


def answer(
    kind: str, msg: Message, context: Context, settings: Settings | None
) -> TrainReply | EvaluateReply:
    """The ``kind`` job ``msg`` asks for, run here or by the node worker the node names.

    A simulation's app (``settings`` given) serves clients of one owner on one machine; a
    SuperNode's serves its node within the limits its node config sets (``NodeLimits``).

    Every reply reports how long its process took to start before its first job (``startup``;
    0 for the jobs after it): in a deployment, where every message gets a process, that is part
    of every round. Every reply has it, as Flower averages only metrics that all replies have.
    """
    startup = _startup_seconds()
    node = NodeConfig.from_context(context, SIMULATED if settings else DEPLOYED)
    job = job_of(kind, msg, context, node, settings)
    reply = submit(Path(node.worker_socket), job) if node.worker_socket else run_job(job)
    reply.seconds[STARTUP] = startup
    if isinstance(reply, EvaluateReply) and not node.limits.share_diagnostics:
        reply.categories, reply.test_ids = [], []  # what its data is about stays on the node
    return reply


def _startup_seconds() -> float:
    """Seconds from this process's start to now, the first time it is asked; then 0."""
    global _STARTED
    if _STARTED:
        return 0.0
    _STARTED = True
    return time.time() - psutil.Process().create_time()


_STARTED = False


def run_job(job: Job) -> TrainReply | EvaluateReply:
    """Train or evaluate as ``job`` asks, on this process's worker for the client; the reply's
    parameters are numpy arrays, so that a message's process sends them without torch."""
    import torch

    torch.set_num_threads(job.threads)
    worker = _cached_worker(job.settings, job.partition_id, job.state_dir, job.own_data)
    instructions = job.instructions
    shared = numpy_to_state(job.shared)
    if job.kind == "train":
        result = worker.train(instructions.server_round, shared, instructions.proximal_mu)
        return TrainReply(
            client_id=worker.client_id,
            # client-level DP averages clients equally, whatever their data
            num_examples=1 if instructions.clipping_norm else result.num_examples,
            train_loss=result.train_loss,
            lr=result.lr,
            proximal_mu=result.proximal_mu,
            seconds=result.seconds,
            shared=in_order_sent(result.shared, job.shared),
        )
    scores = worker.evaluate(instructions.server_round, shared, instructions.detailed)
    return EvaluateReply(
        client_id=worker.client_id,
        n_train=len(worker.data.train),
        n_test=len(worker.data.test),
        rouge_l=scores.rouge_l,
        test_loss=scores.test_loss,
        categories=worker.data.categories,
        test_ids=[example.prompt_id for example in worker.data.test],
        seconds=scores.seconds,
        diagnostics=scores.diagnostics,
    )


def in_order_sent(update: State | None, sent: WireState) -> WireState | None:
    """``update`` as host arrays in the order the server sent its own, which Flower's clipping
    pairs position by position (a resumed server sends them in its checkpoint's sorted order)."""
    if not update:
        return None
    order = sent if set(update) == set(sent) else update  # else a mismatch the server names
    return {name: on_the_wire(update[name]) for name in order}


@functools.lru_cache(maxsize=8)
def _cached_worker(
    settings: Settings, partition: int, state_dir: Path, own_data: str | None
) -> ClientWorker:
    # transformers only where jobs run: a message's process that forwards it needs none
    from flexmoe.client import ClientWorker
    from flexmoe.models.loading import quiet_transformers

    quiet_transformers()
    return ClientWorker(settings, partition, state_dir, own_data)


app = make_client_app()
