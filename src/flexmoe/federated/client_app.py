"""The Flower ClientApp: a thin shell that turns messages into calls on a ClientWorker."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flexmoe.client import ClientWorker
from flexmoe.errors import FlexMoEError
from flexmoe.federated.protocol import (
    EvaluateReply,
    NodeConfig,
    RoundInstructions,
    TrainReply,
    arrays_of,
    settings_from_run_config,
)
from flexmoe.loading import quiet_transformers
from flexmoe.runconfig import RunConfig


def make_client_app(settings: RunConfig | None = None) -> ClientApp:
    """A ClientApp running ``settings``, or the run config's settings when none are given."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        instructions = RoundInstructions.from_message(msg)
        worker = client_worker(context, instructions, settings)
        result = worker.train(instructions.server_round, arrays_of(msg), instructions.proximal_mu)
        reply = TrainReply(
            client_id=worker.client_id,
            num_examples=result.num_examples,
            train_loss=result.train_loss,
            lr=result.lr,
            proximal_mu=result.proximal_mu,
            shared=result.shared,
        )
        return Message(reply.to_content(), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        instructions = RoundInstructions.from_message(msg)
        worker = client_worker(context, instructions, settings)
        scores = worker.evaluate(
            instructions.server_round, arrays_of(msg), detailed=instructions.detailed
        )
        data = worker.data
        reply = EvaluateReply(
            client_id=worker.client_id,
            n_train=len(data.train),
            n_test=len(data.test),
            rouge_l=scores.rouge_l,
            test_loss=scores.test_loss,
            categories=data.categories,
            diagnostics=scores.diagnostics,
        )
        return Message(reply.to_content(), reply_to=msg)

    return app


def client_worker(
    context: Context, instructions: RoundInstructions, settings: RunConfig | None
) -> ClientWorker:
    """This node's worker for the run (one per process, reused across messages)."""
    if settings is None:
        settings, _ = settings_from_run_config(dict(context.run_config))
    node = NodeConfig.from_context(context)
    partitions = node.num_partitions or settings.clients
    if partitions != settings.clients:
        raise FlexMoEError(
            f"{partitions} SuperNodes serve a run configured for {settings.clients} clients; "
            "set clients to the number of SuperNodes"
        )
    root = node.state_dir or instructions.state_root
    state_dir = Path(root) / instructions.run_key / f"client-{node.partition_id}"
    torch.set_num_threads(node.threads)
    return _cached_worker(settings, node.partition_id, state_dir)


@functools.lru_cache(maxsize=8)
def _cached_worker(settings: RunConfig, partition: int, state_dir: Path) -> ClientWorker:
    return ClientWorker(settings, partition, state_dir)


quiet_transformers()
app = make_client_app()
