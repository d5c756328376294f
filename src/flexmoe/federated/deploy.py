"""Run the Flower app on a real local deployment: a SuperLink and N SuperNodes over TLS."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError
from flexmoe.federated.certificates import Certificates, generate_certificates, generate_node_key
from flexmoe.federated.node_worker import key_path
from flexmoe.federated.processes import (
    LOOPBACK,
    Supervisor,
    console_script,
    died,
    free_ports,
    sigterm_as_exit,
)
from flexmoe.federated.protocol import DEPLOYED, OUT_DIR, NodeConfig, NodeLimits
from flexmoe.federated.reaper import reaped
from flexmoe.schema import Scalar, toml_literal

CONNECTION = "flexmoe-local"  # name of the SuperLink connection written for the `flwr` CLI
RUN_ID = re.compile(r"Successfully started run (\d+)")


@dataclass
class Deployment:
    """Everything one local deployment launched, listens on and writes."""

    out_dir: Path
    certs: Certificates
    superlink_port: int
    supernode_ports: list[int]
    env: dict[str, str]
    node_workers: bool = True  # one per SuperNode, keeping its model loaded between messages
    limits: NodeLimits = DEPLOYED  # what each SuperNode lets the server ask of it
    processes: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        self.processes = Supervisor(self.logs, self.env)

    @property
    def superlink_address(self) -> str:
        """The SuperLink's Fleet, Control and Runtime API address (one HTTPS port)."""
        return f"{LOOPBACK}:{self.superlink_port}"

    @property
    def logs(self) -> Path:
        """The folder holding one log file per process."""
        return self.out_dir / "logs"

    def state_dir(self, index: int) -> Path:
        """SuperNode ``index``'s node-local folder (personal state, its worker's socket)."""
        return self.out_dir / "supernodes" / f"node-{index}"

    def node_key(self, index: int) -> Path:
        """SuperNode ``index``'s private key (its public key is ``.pub`` beside it)."""
        return self.out_dir / "keys" / f"node-{index}.key"

    def worker_socket(self, index: int) -> Path | None:
        return self.state_dir(index) / "worker.sock" if self.node_workers else None


def find_app_dir() -> Path:
    """Return the source checkout whose pyproject.toml declares flexmoe's Flower app."""
    root = Path(__file__).resolve().parents[3]  # <root>/src/flexmoe/federated/deploy.py
    pyproject = root / "pyproject.toml"
    if _declares_flower_app(pyproject) and _project_name(pyproject) == "flexmoe":
        return root
    raise FlexMoEError(
        "deploy-local needs a source checkout of flexmoe, whose pyproject.toml declares the "
        "Flower app: clone the repository and run `make install` in it"
    )


def deploy_local(
    app_dir: Path,
    supernodes: int,
    out_dir: Path,
    run_config: Mapping[str, Scalar],
    timeout_s: float = 600,
    node_workers: bool = True,
    share_diagnostics: bool = False,
) -> None:
    """Start a TLS SuperLink and `supernodes` SuperNodes, run the app on them, stop them all.

    With ``node_workers`` each SuperNode gets a node worker that keeps its model loaded; without,
    every message's ClientApp process loads it (Flower's own behaviour). The SuperNodes keep a
    deployment's limits (``NodeLimits``); ``share_diagnostics`` lets them report diagnostics.
    """
    if supernodes < 1:
        raise FlexMoEError(f"--supernodes must be at least 1, got {supernodes}")
    config = {**run_config, OUT_DIR: str(out_dir.resolve())}
    _check_app_dir(app_dir, config)
    deadline = time.monotonic() + timeout_s
    with reaped(), sigterm_as_exit():  # what it starts dies with it, even on SIGKILL
        deployment = _prepare(out_dir.resolve(), supernodes, node_workers)
        deployment.limits = replace(DEPLOYED, share_diagnostics=share_diagnostics)
        processes = deployment.processes
        sockets = [deployment.worker_socket(index) for index in range(supernodes)]
        try:
            _say("starting the SuperLink and registering the SuperNodes' keys")
            processes.launch("superlink", superlink_command(deployment))
            _register_supernodes(deployment, deadline)
            _say(f"starting {supernodes} SuperNodes" + (" and their node workers" * node_workers))
            for index, socket_path in enumerate(sockets):
                if socket_path is not None:
                    processes.launch(f"node-worker-{index}", node_worker_command(socket_path))
                    processes.wait_for_file(key_path(socket_path), deadline)
                processes.launch(f"supernode-{index}", supernode_command(deployment, index))
            _write_manifest(deployment)
            _wait_for_supernodes(deployment, deadline)
            _say("running the app (flwr run)")
            _run_app(deployment, app_dir, config, deadline)
        finally:
            processes.stop()
            for socket_path in filter(None, sockets):  # a stopped worker's socket and key
                socket_path.unlink(missing_ok=True)
                key_path(socket_path).unlink(missing_ok=True)


def _say(step: str) -> None:
    print(f"flexmoe deploy-local: {step}", flush=True)


def superlink_command(deployment: Deployment) -> list[str]:
    """The `flower-superlink` command line: TLS on one loopback port, ServerApp in a subprocess."""
    certs = deployment.certs
    return [
        *console_script("flower-superlink"),
        "--ssl-ca-certfile", str(certs.ca),
        "--ssl-certfile", str(certs.cert),
        "--ssl-keyfile", str(certs.key),
        "--host", LOOPBACK,
        "--port", str(deployment.superlink_port),
        "--enable-supernode-auth",
        "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def supernode_command(deployment: Deployment, index: int) -> list[str]:
    """The `flower-supernode` command line for partition `index`, trusting the private CA."""
    certs = deployment.certs
    socket_path = deployment.worker_socket(index)
    node = NodeConfig(
        index,
        len(deployment.supernode_ports),
        str(deployment.state_dir(index)),
        worker_socket=None if socket_path is None else str(socket_path),
        limits=deployment.limits,
    )
    return [
        *console_script("flower-supernode"),
        "--superlink", deployment.superlink_address,
        "--root-certificates", str(certs.ca),
        "--node-config", format_config(node.to_flat()),
        "--auth-supernode-private-key", str(deployment.node_key(index)),
        "--host", LOOPBACK,
        "--port", str(deployment.supernode_ports[index]),
        "--ssl-ca-certfile", str(certs.ca),
        "--ssl-certfile", str(certs.cert),
        "--ssl-keyfile", str(certs.key),
        "--isolation", "subprocess",
    ]  # fmt: skip


def node_worker_command(socket_path: Path) -> list[str]:
    """The `flexmoe node-worker` command line serving one SuperNode's jobs."""
    return [sys.executable, "-m", "flexmoe", "node-worker", "--socket", str(socket_path)]


def format_config(config: Mapping[str, Scalar]) -> str:
    """Render a config as Flower's space-separated `key=value` pairs with TOML values."""
    return " ".join(f"{key}={toml_literal(value)}" for key, value in config.items())


def _prepare(out_dir: Path, supernodes: int, node_workers: bool) -> Deployment:
    """Create the output folders, certificates, `flwr` CLI config and ports of a deployment."""
    for sub in ("logs", "supernodes", "flwr-home"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    ports = free_ports(1 + supernodes)
    deployment = Deployment(
        out_dir=out_dir,
        certs=generate_certificates(out_dir / "certs"),
        superlink_port=ports[0],
        supernode_ports=ports[1:],
        env=_child_env(out_dir / "flwr-home"),
        node_workers=node_workers,
    )
    _write_flwr_config(deployment)
    return deployment


def _run_app(
    deployment: Deployment, app_dir: Path, config: Mapping[str, Scalar], deadline: float
) -> None:
    """Submit the app with `flwr run --stream`, wait for the run to end, check it completed."""
    command = [
        *console_script("flwr"), "run", str(app_dir), CONNECTION,
        "--run-config", format_config(config), "--stream",
    ]  # fmt: skip
    client = deployment.processes.launch("flwr-run", command)
    deployment.processes.wait_for_exit(client, deadline)
    if client.popen.returncode != 0:
        raise died(client)
    match = RUN_ID.search(client.log.read_text(errors="replace"))
    if match is None:
        raise FlexMoEError(f"`flwr run` started no run; see {client.log}")
    status = _run_status(deployment, int(match.group(1)))
    while not status.startswith("finished"):  # the log stream ended early: poll instead
        deployment.processes.check_alive(skip=client)
        if time.monotonic() > deadline:
            raise FlexMoEError(f"the Flower run timed out; see {client.log}")
        time.sleep(2)
        status = _run_status(deployment, int(match.group(1)))
    if status != "finished:completed":
        raise FlexMoEError(
            f"the Flower run ended as {status!r}; see {client.log} "
            f"and {deployment.logs / 'superlink.log'}"
        )


def _register_supernodes(deployment: Deployment, deadline: float) -> None:
    """Register every SuperNode's public key at the SuperLink, which refuses any other node."""
    deployment.processes.wait_for_port(deployment.superlink_port, deadline)
    for index in range(len(deployment.supernode_ports)):
        public = generate_node_key(deployment.node_key(index))
        _flwr_json(deployment, "supernode", "register", str(public), CONNECTION)


def _wait_for_supernodes(deployment: Deployment, deadline: float) -> None:
    """Wait until every SuperNode is registered and online at the SuperLink."""
    deployment.processes.wait_for_port(deployment.superlink_port, deadline)
    expected = len(deployment.supernode_ports)
    while True:
        nodes = _flwr_json(deployment, "supernode", "ls", CONNECTION)["nodes"]
        if sum(node["status"] == "online" for node in nodes) >= expected:
            return
        deployment.processes.check_alive()
        if time.monotonic() > deadline:
            raise FlexMoEError(f"SuperNodes did not come online; see {deployment.logs}")
        time.sleep(1)


def _run_status(deployment: Deployment, run_id: int) -> str:
    """The run's status text as `flwr ls` reports it (e.g. `finished:completed`)."""
    runs = _flwr_json(deployment, "ls", CONNECTION, "--run-id", str(run_id))["runs"]
    return str(runs[0]["status"])


def _flwr_json(deployment: Deployment, *args: str) -> dict[str, Any]:
    """Run a `flwr` CLI command against our SuperLink and parse its JSON output."""
    command = [*console_script("flwr"), *args, "--format", "json"]
    result = subprocess.run(command, env=deployment.env, capture_output=True, text=True)
    try:
        answer = json.loads(result.stdout)
    except ValueError as error:
        raise FlexMoEError(f"`flwr {' '.join(args)}` failed: {result.stderr.strip()}") from error
    if answer.get("success") is False:
        raise FlexMoEError(f"`flwr {' '.join(args)}` failed: {answer}")
    return answer


def _write_manifest(deployment: Deployment) -> None:
    """Record ports, PIDs, commands and logs in deployment.json (for people and tests)."""
    manifest = {
        "superlink": deployment.superlink_address,
        "supernode_ports": deployment.supernode_ports,
        "certificates": {k: str(v) for k, v in vars(deployment.certs).items()},
        "processes": [
            {"name": p.name, "pid": p.popen.pid, "command": p.popen.args, "log": str(p.log)}
            for p in deployment.processes.processes
        ],
    }
    (deployment.out_dir / "deployment.json").write_text(json.dumps(manifest, indent=2))


def _write_flwr_config(deployment: Deployment) -> None:
    """Write the `flwr` CLI's config.toml naming our SuperLink and its CA (in FLWR_HOME)."""
    text = (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{deployment.superlink_address}"\n'
        f"root-certificates = {toml_literal(str(deployment.certs.ca))}\n"
    )
    (Path(deployment.env["FLWR_HOME"]) / "config.toml").write_text(text)


def _child_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry, venv scripts on PATH."""
    scripts = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")]),
    }


def _check_app_dir(app_dir: Path, run_config: Mapping[str, Scalar]) -> None:
    """Refuse folders that hold no Flower app, that `flwr run` would rewrite, or lack keys."""
    pyproject = app_dir / "pyproject.toml"
    if not _declares_flower_app(pyproject):
        raise FlexMoEError(f"{pyproject} declares no Flower app ([tool.flwr.app])")
    flwr = tomllib.loads(pyproject.read_text())["tool"]["flwr"]
    if "federations" in flwr:
        raise FlexMoEError(
            f"{pyproject} has a [tool.flwr.federations] table, which `flwr run` (1.42) moves "
            "into its own config and comments out in the file; remove the table"
        )
    unknown = sorted(set(run_config) - set(_flat_keys(flwr["app"].get("config", {}))))
    if unknown:
        raise FlexMoEError(
            f"run config keys {unknown} are not declared in [tool.flwr.app.config] of {pyproject}"
        )


def _flat_keys(table: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys of a TOML table as Flower's run config names them (``train.lr``)."""
    keys = []
    for key, value in table.items():
        name = f"{prefix}{key}"
        keys += _flat_keys(value, f"{name}.") if isinstance(value, dict) else [name]
    return keys


def _declares_flower_app(pyproject: Path) -> bool:
    """Whether `pyproject` exists and has a [tool.flwr.app] table."""
    if not pyproject.is_file():
        return False
    config = tomllib.loads(pyproject.read_text())
    return "app" in config.get("tool", {}).get("flwr", {})


def _project_name(pyproject: Path) -> str | None:
    """The [project] name in `pyproject`."""
    return tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
