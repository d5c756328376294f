"""Running a whole federation in one process with Flower's simulation engine."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import warnings
from collections.abc import Iterator

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from torch import nn

from flexmoe.client import truncation_report
from flexmoe.errors import FlexMoEError
from flexmoe.evaluation.diagnostics import mmlu_questions
from flexmoe.evaluation.plan import plan_method
from flexmoe.federated.client_app import make_client_app, simulated_threads
from flexmoe.federated.federation import run_federation
from flexmoe.federated.reaper import reaped
from flexmoe.federated.run import Run, check_client_states
from flexmoe.flex.moe import find_moe_blocks
from flexmoe.hardware import Placement
from flexmoe.io import atomic_write_text
from flexmoe.models.loading import check_weight_files, load_config, meta_model
from flexmoe.placement import cuda_index
from flexmoe.results import (
    DATA_FILE,
    RESULTS_FILE,
    RunResults,
    read_results,
)
from flexmoe.settings import Settings

RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"


def simulate(run: Run, progress: bool = True) -> RunResults:
    """Run ``run`` on one simulated SuperNode per client; returns the results.

    The caller holds the run's folder from its resolution to the last write (``claimed``). A
    resumed run needs every client that took part to have its personal state, but for those
    ``run.regraft`` names (``check_client_states``).
    """
    check_client_states(run)
    report = check_run(run.settings)
    atomic_write_text(run.out / DATA_FILE, json.dumps(report, indent=1) + "\n")
    failures: list[BaseException] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, run, progress)
        except BaseException as error:  # re-raised below, outside Flower's runtime
            failures.append(error)

    settings = run.settings
    placement = Placement.resolve(settings.device, settings.dtype)
    resources = client_resources(placement, simulated_threads(settings))
    _quiet_flower()
    keep_ray_on_loopback()
    # no Ray process outlives this one, even if it is killed
    with reaped(), visible_gpus(settings.device):
        _start_ray(num_cpus=os.cpu_count() or 1)
        run_simulation(
            server_app=server,
            client_app=make_client_app(settings),
            num_supernodes=settings.federation.clients,
            backend_config={"client_resources": resources},
        )
    if failures:
        raise failures[0]
    results = run.out / RESULTS_FILE
    if not results.is_file():
        raise FlexMoEError(f"the run ended without writing {results}; see the log above")
    return read_results(results)


@contextlib.contextmanager
def visible_gpus(device: str) -> Iterator[None]:
    """For ``cuda:N``, Ray (started in the block) sees GPU N alone and gives it to the clients'
    actors, in which it is ``cuda`` (``actor_device``); other devices leave CUDA's view as is."""
    index = cuda_index(device)
    if index is None:
        yield
        return
    before = os.environ.get(CUDA_VISIBLE)
    visible = before.split(",") if before else [str(i) for i in range(torch.cuda.device_count())]
    if index >= len(visible):
        raise FlexMoEError(
            f"device {device!r} is not available: {len(visible)} CUDA devices are visible here"
        )
    os.environ[CUDA_VISIBLE] = visible[index]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CUDA_VISIBLE, None)
        else:
            os.environ[CUDA_VISIBLE] = before


def client_resources(placement: Placement, cpu_threads: int) -> dict[str, float]:
    """What each simulated client process (a Ray actor holding one base model) reserves.

    On CUDA one GPU each, so there are as many processes as GPUs and each holds its base
    model alone. On the CPU ``cpu_threads`` cores: one, or all of them for a method that trains
    the base weights, whose client holds a trainable copy of the whole model with gradients and
    AdamW moments (about five times the weights), so that one such client runs at a time.
    """
    if placement.device.type != "cuda":
        return {"num_cpus": cpu_threads, "num_gpus": 0.0}
    gpus = 1 if placement.device.index is not None else torch.cuda.device_count()
    return {"num_cpus": max(1, (os.cpu_count() or 1) // gpus), "num_gpus": 1.0}


def check_run(settings: Settings) -> dict[str, dict[str, int]]:
    """Fail early, with a clear error, on a bad model, data set or setting that needs the model,
    rather than inside a client; returns the data's ``truncation_report``.

    The model is built from its config on the meta device (shapes, no memory: the paper's model
    would take 28.6 GB and minutes to load here) and its weight files' headers are read; the
    clients load the weights themselves.
    """
    placement = Placement.resolve(settings.device, settings.dtype)  # no such device: one line
    check_weight_files(settings.model)
    model = meta_model(load_config(settings.model), placement.dtype)
    wanted = settings.graft.experts_per_layer
    if settings.chosen_method().grafts:
        experts = min(view.num_experts for view in find_moe_blocks(model))
        if wanted > experts:
            raise FlexMoEError(
                f"experts-per-layer {wanted} is more than the {experts} experts per layer of "
                f"{settings.model}; give at most {experts}"
            )
    check_full_model_fits(settings, model, placement)
    report = truncation_report(settings)
    if settings.evaluation.diagnostics and settings.evaluation.mmlu_per_topic:
        mmlu_questions()  # fetched once here, not by every client at once
    return report


def check_full_model_fits(settings: Settings, model: nn.Module, placement: Placement) -> None:
    """Refuse a method that trains every weight (fedavg-full) where one client's training memory,
    as ``flexmoe plan`` estimates it, is more than the device has: it would fail in the first
    round, after the model loaded, or swap the host to a standstill."""
    method = settings.chosen_method()
    if not method.shared.trains_base_weights:
        return
    train = settings.train
    examples = train.examples_per_forward
    memory = plan_method(model, method, [], examples, settings.data.max_length, 0).memory
    kept = memory.activations_checkpointed if train.gradient_checkpointing else memory.activations
    needed = memory.total - memory.activations + kept
    available = placement.memory_bytes
    if needed > available:
        raise FlexMoEError(
            f"{settings.method} trains every weight of {settings.model}: one client needs about "
            f"{needed / 1e9:.1f} GB at {examples} x {settings.data.max_length} tokens a forward "
            f"pass (flexmoe plan's estimate), more than the {available / 1e9:.1f} GB of "
            f"{placement.device}; {_smaller_forward(examples)}max-length, turn on "
            "gradient-checkpointing, or use a method that trains adapters (fedavg, flex)"
        )


def _smaller_forward(examples: int) -> str:
    """How a forward pass of ``examples`` examples could hold fewer: the start of the advice."""
    if examples > 1:
        return f"set micro-batch-size below {examples}, a smaller "
    return "use a smaller "


def keep_ray_on_loopback() -> None:
    """Make every Ray process of this machine's simulations listen on 127.0.0.1 only.

    Ray binds its GCS server, raylet and workers to the node's address, which on Linux it takes
    from the network interface, reachable from other hosts and unauthenticated. With clustering
    off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ``ray`` is imported, hence also set
    on the imported module) the node's address is the loopback one. A test lists a running
    simulation's sockets.
    """
    os.environ[RAY_CLUSTER_ENV] = "0"  # for the processes Ray starts
    import ray._private.ray_constants as ray_constants  # imported already, by Flower

    ray_constants.ENABLE_RAY_CLUSTER = False


def _start_ray(num_cpus: int) -> None:
    """Start Ray here rather than in Flower's backend (which then uses it), keeping this
    process's SIGTERM handler: ``ray.init`` replaces it with ``sys.exit``, and the command's
    own handler is what stops a run cleanly."""
    import ray

    if ray.is_initialized():  # left by an earlier run of this process that failed early
        ray.shutdown()
    handler = signal.getsignal(signal.SIGTERM)
    with warnings.catch_warnings():  # a notice of Ray's future defaults, not ours to act on
        warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
        ray.init(
            num_cpus=num_cpus,
            log_to_driver=False,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)


class _NoSimulationDeprecation(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated: ``flexmoe run`` is the
    user's command, and ``flwr run .`` is documented beside it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _quiet_flower() -> None:
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _NoSimulationDeprecation) for f in flower.filters):
        flower.addFilter(_NoSimulationDeprecation())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
