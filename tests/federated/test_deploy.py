"""deploy-local: a real TLS SuperLink and SuperNodes on loopback run flexmoe's own app."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from flwr.common.config import parse_config_args
from safetensors.numpy import load_file

from flexmoe.cli import main
from flexmoe.errors import FlexMoEError
from flexmoe.federated import certificates, deploy, processes
from flexmoe.federated.deploy import deploy_local, find_app_dir, format_config
from flexmoe.results import RESULTS_FILE, read_results

PYPROJECT = """\
[project]
name = "standin"
version = "0.1.0"

[tool.flwr.app]
publisher = "flexmoe"

[tool.flwr.app.components]
serverapp = "standin_app:server"
clientapp = "standin_app:client"

[tool.flwr.app.config]
num-server-rounds = 1
fail = false
hold = 0.0
out-dir = ""
"""

APP = '''\
"""FedAvg on one tiny array; the results file lists which partitions replied."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail"]:
        raise RuntimeError("stand-in failure")
    time.sleep(float(context.run_config["hold"]))
    partitions = []

    def collect(replies: list[RecordDict], key: str) -> MetricRecord:
        partitions.extend(int(reply["metrics"]["partition-id"]) for reply in replies)
        return MetricRecord({"replies": len(replies)})

    strategy = FedAvg(fraction_evaluate=0.0, train_metrics_aggr_fn=collect)
    rounds = int(context.run_config["num-server-rounds"])
    result = strategy.start(grid, ArrayRecord([np.zeros(3, np.float32)]), num_rounds=rounds)
    final = result.arrays.to_numpy_ndarrays()[0].tolist()
    out = Path(str(context.run_config["out-dir"]))
    (out / "results.json").write_text(json.dumps({"partitions": partitions, "final": final}))


@client.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    state = Path(str(context.node_config["state-dir"]))
    state.mkdir(parents=True, exist_ok=True)
    (state / "partition.txt").write_text(f"{partition}/{context.node_config['num-partitions']}")
    arrays = [a + partition + 1 for a in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"num-examples": 1, "partition-id": partition})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "standin"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "standin_app.py").write_text(APP)
    return folder


def survivors(out_dir: Path, timeout_s: float = 10) -> list[int]:
    """Live (non-zombie) processes launched for `out_dir`: they carry its FLWR_HOME."""
    marker = f"FLWR_HOME={out_dir.resolve() / 'flwr-home'}".encode()
    deadline = time.monotonic() + timeout_s
    while True:
        found = [pid for pid in _live_pids() if marker in _environ(pid).split(b"\0")]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _live_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().split(") ")[1][0] != "Z":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def assert_all_stopped(out_dir: Path) -> None:
    manifest = json.loads((out_dir / "deployment.json").read_text())
    pids = [process["pid"] for process in manifest["processes"]]
    assert pids and not set(pids) & set(_live_pids())
    assert survivors(out_dir) == []


@pytest.mark.slow
def test_deploy_local_runs_flexmoe_on_every_supernode_over_tls(
    tmp_path, random_model, dolly_file, capsys
):
    out = tmp_path / "out"
    argv = [
        "deploy-local",
        "--supernodes",
        "2",
        "--rounds",
        "1",
        "--out",
        str(out),
        "--model",
        str(random_model),
        "--data",
        str(dolly_file),
        "--max-length",
        "512",
        "--max-train",
        "8",
        "--max-test",
        "8",
        "--batch-size",
        "4",
        "--local-steps",
        "2",
        "--max-new-tokens",
        "4",
    ]
    assert main(argv) == 0
    assert "mean ROUGE-L" in capsys.readouterr().out

    results = read_results(out / RESULTS_FILE)
    assert [c.client_id for c in results.clients] == [0, 1]
    # a deployment's nodes keep what their data is about, unless told to share it
    assert all(c.categories == [] and c.knowledge is None for c in results.clients)
    assert results.rounds == 1 and results.comm.bytes_up > 0
    for index in range(2):  # each SuperNode keeps its personal state in its own folder
        state = out / "supernodes" / f"node-{index}"
        assert [p.parent.parent.name for p in state.rglob("personal.safetensors")] == [
            f"client-{index}"
        ]
    assert "https://127.0.0.1" in (out / "logs" / "superlink.log").read_text()
    assert stat.S_IMODE((out / "certs" / "server.key").stat().st_mode) == 0o600
    for private in ("certs", "keys"):  # what a client of the SuperLink needs is the owner's
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o700
    assert sorted(p.name for p in (out / "keys").iterdir()) == [
        "node-0.key", "node-0.pub", "node-1.key", "node-1.pub",
    ]  # fmt: skip
    assert "--enable-supernode-auth" in (out / "deployment.json").read_text()
    assert_all_stopped(out)
    assert not list((out / "supernodes").rglob("worker.sock*"))  # no stale socket or key
    exported = tmp_path / "client-1"  # its model, from its SuperNode's folder
    assert main(["export", str(out), "--client", "1", "--out", str(exported)]) == 0
    node = next((out / "supernodes" / "node-1").rglob("personal.safetensors"))
    ours, theirs = load_file(exported / "personal.safetensors"), load_file(node)
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


@pytest.mark.slow
def test_a_failing_run_raises_and_stops_everything(app_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FlexMoEError, match=r"finished:failed.*flwr-run\.log"):
        deploy_local(app_dir, supernodes=1, out_dir=out, run_config={"fail": True})
    assert "stand-in failure" in (out / "logs" / "flwr-run.log").read_text()
    assert_all_stopped(out)


def test_undeclared_run_config_keys_are_refused_before_launching(app_dir, tmp_path):
    with pytest.raises(FlexMoEError, match=r"\['epochs'\] are not declared"):
        deploy_local(app_dir, supernodes=1, out_dir=tmp_path / "out", run_config={"epochs": 2})
    assert not (tmp_path / "out").exists()


def test_a_federations_table_is_refused(app_dir, tmp_path):
    pyproject = app_dir / "pyproject.toml"
    pyproject.write_text(PYPROJECT + '\n[tool.flwr.federations]\ndefault = "local"\n')
    with pytest.raises(FlexMoEError, match="federations"):
        deploy_local(app_dir, supernodes=1, out_dir=tmp_path / "out", run_config={})


def test_certificates_cover_loopback_and_chain_to_the_ca(tmp_path):
    certs = certificates.generate_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(certs.key.stat().st_mode) == 0o600


def test_config_values_survive_flowers_parser():
    config = {"partition-id": 3, "state-dir": "/tmp/a b/node-3", "lr": 0.5, "on": True}
    assert parse_config_args([format_config(config)]) == config


def test_stop_all_also_kills_descendants_in_their_own_session(tmp_path):
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    env = {"FLWR_HOME": str(tmp_path / "flwr-home")}
    popen = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    time.sleep(0.5)
    processes.stop_all([processes.Process("parent", popen, tmp_path / "parent.log")])
    assert popen.returncode is not None
    assert survivors(tmp_path, timeout_s=5) == []


def test_find_app_dir_needs_a_source_checkout(tmp_path, monkeypatch):
    module = tmp_path / "src" / "flexmoe" / "federated" / "deploy.py"
    monkeypatch.setattr(deploy, "__file__", str(module))
    with pytest.raises(FlexMoEError, match="make install"):
        find_app_dir()
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "flexmoe"\n\n[tool.flwr.app]\npublisher = "flexmoe"\n'
    )
    assert find_app_dir() == tmp_path


def test_the_app_bundle_carries_code_and_configuration_but_no_data_file(tmp_path):
    import io
    import shutil
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    root = find_app_dir()
    for name in ("pyproject.toml", "README.md", ".gitignore"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    private = {"data/alice.jsonl": '{"instruction": "secret"}\n', "alice.json": "[]",
               "src/flexmoe/notes.jsonl": "{}\n", "data/records.yaml": "a: 1\n"}  # fmt: skip
    for name, text in private.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(tmp_path))).namelist()
    assert "src/flexmoe/federated/client_app.py" in names and "pyproject.toml" in names
    assert not set(private) & set(names)
    assert {Path(n).suffix for n in names} == {".py", ".toml", ".md", ""}  # "" : .info/CONTENT


KILLED_DEPLOYER = """
import sys
from pathlib import Path
from flexmoe.federated.deploy import deploy_local
deploy_local(Path(sys.argv[1]), 2, Path(sys.argv[2]), {"hold": 300.0}, node_workers=False)
"""


@pytest.mark.slow
def test_a_deployment_killed_with_sigkill_leaves_no_process_behind(app_dir, tmp_path):
    out = tmp_path / "out"
    deployer = subprocess.Popen([sys.executable, "-c", KILLED_DEPLOYER, str(app_dir), str(out)])
    deadline = time.monotonic() + 120
    while "Started task" not in _logs(out) and time.monotonic() < deadline:  # the ServerApp runs
        time.sleep(0.5)
    launched = survivors(out, timeout_s=0)
    assert len(launched) >= 4, "SuperLink, SuperNodes and their app processes should be up"
    deployer.kill()
    deployer.wait()
    assert survivors(out, timeout_s=15) == []


def _logs(out: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (out / "logs").glob("*.log"))


@pytest.mark.slow
def test_an_unregistered_supernode_is_refused(app_dir, tmp_path):
    out = tmp_path / "out"
    deployer = subprocess.Popen([sys.executable, "-c", KILLED_DEPLOYER, str(app_dir), str(out)])
    try:
        deadline = time.monotonic() + 120
        while "Started task" not in _logs(out) and time.monotonic() < deadline:
            time.sleep(0.5)
        manifest = json.loads((out / "deployment.json").read_text())
        key = tmp_path / "keys" / "stranger.key"
        certificates.generate_node_key(key)  # a valid key, but never registered
        stranger = [
            *processes.console_script("flower-supernode"),
            "--superlink", manifest["superlink"],
            "--root-certificates", manifest["certificates"]["ca"],
            "--auth-supernode-private-key", str(key),
            "--node-config", "partition-id=0 num-partitions=2",
            "--host", "127.0.0.1", "--port", str(processes.free_ports(1)[0]),
        ]  # fmt: skip
        log = tmp_path / "stranger.log"
        with log.open("w") as sink:
            env = deploy._child_env(tmp_path / "stranger-home")
            node = subprocess.Popen(stranger, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            node.wait(timeout=60)
        finally:
            node.kill()
    finally:
        deployer.kill()
        deployer.wait()
    assert node.returncode != 0
    assert "[code: 2004] Failed to activate SuperNode" in log.read_text()
    assert survivors(out, timeout_s=15) == []
