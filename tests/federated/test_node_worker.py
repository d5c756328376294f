"""The node worker: a deployment's long-lived process that keeps a client's model loaded."""

import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import numpy as np
import pytest

from flexmoe.errors import FlexMoEError
from flexmoe.federated.federation import initial_arrays
from flexmoe.federated.node_worker import Job, key_path, submit
from flexmoe.federated.protocol import RoundInstructions
from flexmoe.federated.records import arrays_to_numpy
from flexmoe.methods import get_method
from flexmoe.settings import Settings

pytestmark = pytest.mark.slow  # a node worker process per test


@pytest.fixture
def worker_socket(tmp_path):
    socket = tmp_path / "w.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "flexmoe", "node-worker", "--socket", str(socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not key_path(socket).exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.1)
    yield socket
    process.terminate()
    assert process.wait(timeout=30) == 0  # SIGTERM is a clean stop
    assert not key_path(socket).exists()


def job(config: Settings, tmp_path, kind: str, round_: int) -> Job:
    shared = arrays_to_numpy(initial_arrays(config, get_method(config.method)))  # as sent
    instructions = RoundInstructions(round_, "run", str(tmp_path / "state"))
    return Job(kind, config, 0, tmp_path / "state" / "client-0", 1, instructions, shared)


def test_the_worker_answers_jobs_and_keeps_the_model_between_them(
    tmp_path, worker_socket, random_model, dolly_file
):
    config = Settings.of(
        model=str(random_model), data=str(dolly_file), clients=2, rounds=2, local_steps=1,
        batch_size=4, max_length=512, max_test=2, max_new_tokens=2, device="cpu",
    )  # fmt: skip
    first = submit(worker_socket, job(config, tmp_path, "train", 1))
    second = submit(worker_socket, job(config, tmp_path, "train", 2))
    assert first.client_id == 0 and first.shared and first.train_loss > 0
    assert all(isinstance(a, np.ndarray) for a in first.shared.values())  # no torch to send it
    assert second.seconds["load"] < first.seconds["load"] / 10  # already loaded
    assert (tmp_path / "state" / "client-0" / "round-0002").is_dir()
    scores = submit(worker_socket, job(config, tmp_path, "evaluate", 2))
    assert scores.n_test == 2 and scores.seconds["load"] < first.seconds["load"] / 10


def test_a_failing_job_is_one_error_and_the_worker_lives_on(
    tmp_path, worker_socket, random_model, dolly_file
):
    config = Settings.of(model=str(tmp_path / "missing"), data=str(dolly_file), device="cpu")
    with pytest.raises(FlexMoEError, match="does not exist"):
        submit(worker_socket, Job("train", config, 0, tmp_path, 1, None, {}))
    with pytest.raises(AuthenticationError):
        Client(str(worker_socket), family="AF_UNIX", authkey=b"not the key")
    with pytest.raises(FlexMoEError, match="does not exist"):  # still answering
        submit(worker_socket, Job("train", config, 0, tmp_path, 1, None, {}))


def test_a_node_without_its_worker_says_how_to_start_one(tmp_path):
    with pytest.raises(FlexMoEError, match="flexmoe node-worker --socket"):
        submit(tmp_path / "none.sock", Job("train", Settings(), 0, tmp_path, 1, None, {}))


def test_a_deployed_messages_process_imports_no_torch():
    """Flower starts a process per message: the ClientApp that forwards the job to the node
    worker must not pay for importing torch (seconds) in each one."""
    probe = "import sys, flexmoe.federated.client_app; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
