"""The Flower ClientApp: a thin shell that turns messages into calls on a ClientWorker."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexmoe.client import ClientWorker
from flexmoe.errors import FlexMoEError
from flexmoe.federated.records import arrays_to_state, state_to_arrays
from flexmoe.loading import quiet_transformers
from flexmoe.runconfig import RunConfig

RUN_KEYS = ("run-key", "state-root", "server-round", "proximal-mu", "threads", "detailed")

app = ClientApp()
quiet_transformers()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    worker = _worker(context, config)
    result = worker.train(
        int(config["server-round"]),
        arrays_to_state(msg.content["arrays"]),
        float(config.get("proximal-mu", 0.0)),
    )
    metrics = {"num-examples": result.num_examples, "client-id": worker.client_id}
    content = RecordDict(
        {
            "arrays": state_to_arrays(result.shared),
            "metrics": MetricRecord({**metrics, **result.metrics}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    worker = _worker(context, config)
    metrics, detail = worker.evaluate(
        int(config["server-round"]),
        arrays_to_state(msg.content["arrays"]),
        detailed=bool(config.get("detailed", False)),
    )
    data = worker.data
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "num-examples": len(data.test),
                    "client-id": worker.client_id,
                    "n-train": len(data.train),
                    **metrics,
                }
            ),
            "client": ConfigRecord(
                {"categories": [str(c) for c in data.categories], "detail": json.dumps(detail)}
            ),
        }
    )
    return Message(content, reply_to=msg)


def _worker(context: Context, config: ConfigRecord) -> ClientWorker:
    settings = RunConfig().updated({k: v for k, v in config.items() if k not in RUN_KEYS})
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config.get("num-partitions", settings.clients))
    if partitions != settings.clients:
        raise FlexMoEError(
            f"{partitions} SuperNodes serve a run configured for {settings.clients} clients; "
            "set clients to the number of SuperNodes"
        )
    root = context.node_config.get("state-dir") or config["state-root"]
    state_dir = Path(str(root)) / str(config["run-key"]) / f"client-{partition}"
    torch.set_num_threads(int(config.get("threads", 1)))
    return _cached_worker(settings, partition, state_dir)


@functools.lru_cache(maxsize=8)
def _cached_worker(settings: RunConfig, partition: int, state_dir: Path) -> ClientWorker:
    return ClientWorker(settings, partition, state_dir)
