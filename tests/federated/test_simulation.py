"""Whole runs on Flower's simulation engine (Ray): results, checkpoints, resume, traffic."""

import json
import shutil
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.numpy import load_file

from flexmoe.cache import CACHE_ENV
from flexmoe.cli import main
from flexmoe.data import hold_out_test_pools, load_dataset, select_categories
from flexmoe.errors import FlexMoEError
from flexmoe.federated.simulation import client_resources, simulated_threads
from flexmoe.hardware import Placement
from flexmoe.results import (
    CHECKPOINT_DIR,
    DATA_FILE,
    RESULTS_FILE,
    ROUNDS_FILE,
    RunResults,
    read_checkpoint,
    read_results,
    read_rounds,
    to_plain,
)
from flexmoe.settings import Settings

pytestmark = pytest.mark.slow

SMALL = [
    "--clients",
    "2",
    "--local-steps",
    "2",
    "--batch-size",
    "4",
    "--max-train",
    "12",
    "--max-test",
    "3",
    "--max-new-tokens",
    "6",
    "--max-length",
    "512",
]


def run(out, *extra) -> RunResults:
    folder = [] if "--resume" in extra else ["--out", str(out)]
    assert main(["run", *folder, *SMALL, *extra]) == 0
    return read_results(out / RESULTS_FILE)


def fake_mmlu(cache: Path, per_topic: int = 7) -> None:
    """An MMLU file where the flexmoe cache keeps it: two topics, answers cycling A..D."""
    rows = [
        {"question": f"{topic} question {i}?", "answer_a": "one", "answer_b": "two",
         "answer_c": "three", "answer_d": "four", "correct_answer": "ABCD"[i % 4], "topic": topic}
        for topic in ("anatomy", "astronomy")
        for i in range(per_topic)
    ]  # fmt: skip
    (cache / "mmlu").mkdir(parents=True)
    (cache / "mmlu" / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_replies_late_past_the_reply_timeout_fail_the_round_and_the_run_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    # a client takes seconds to start, so no reply comes within 0.5 s
    args = ["run", "--out", str(out), *SMALL, "--rounds", "1", "--reply-timeout", "0.5"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 of 2 clients did not reply within 0.5 s (reply-timeout)" in err
    assert read_checkpoint(out).round == 0 and not (out / RESULTS_FILE).exists()
    assert main(["run", "--resume", str(out), "--reply-timeout", "0"]) == 0
    results = read_results(out / RESULTS_FILE)
    assert results.config["reply_timeout"] == 0
    # the default data: the packaged Dolly-15k, each client tested on its category's pool head
    dolly = select_categories(load_dataset("dolly"), "default")
    pools = hold_out_test_pools(dolly, 100, 0.2).pools
    two = ["classification", "closed_qa"]  # the largest two of the paper's four
    assert [c.categories for c in results.clients] == [[c] for c in two]
    assert [c.test_ids for c in results.clients] == [
        [e.prompt_id for e in pools[c][:3]] for c in two
    ]
    report = json.loads((out / DATA_FILE).read_text())
    assert sorted(report) == two and {r["examples"] for r in report.values()} == {15}


def test_resumed_run_equals_uninterrupted_run(tmp_path, dolly_file, random_model, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    fake_mmlu(tmp_path / "cache")
    common = ["--model", str(random_model), "--data", str(dolly_file)]
    straight = run(
        tmp_path / "straight", *common, "--rounds", "2", "--eval-every", "1",
        "--mmlu-per-topic", "2",
    )  # fmt: skip
    run(tmp_path / "first", *common, "--rounds", "1")
    # a run folder moved elsewhere resumes as itself: its clients' state travels with it
    shutil.copytree(tmp_path / "first", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "first")
    resumed = run(tmp_path / "resumed", "--resume", str(tmp_path / "resumed"), "--rounds", "2")
    assert resumed.rounds == straight.rounds == 2
    assert resumed.mean_rouge_l == straight.mean_rouge_l
    assert resumed.mean_test_loss == pytest.approx(straight.mean_test_loss, abs=1e-6)
    # downlink carries the state folder's path, which differs here; uplink must not differ at all
    assert resumed.comm.bytes_up == straight.comm.bytes_up
    assert [c.rouge_l for c in resumed.clients] == [c.rouge_l for c in straight.clients]
    saved = read_checkpoint(tmp_path / "resumed")
    assert saved.round == 2 and len(saved.history) == 2
    states = tmp_path / "resumed" / "clients" / saved.run_id
    # a client's state and predictions quote its private data: its owner's alone
    clients = [
        states,
        *(p for client in states.glob("client-*") for p in (client, *client.rglob("*"))),
    ]
    assert len(clients) > 10
    for path in clients:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    assert sorted(p.name for p in (states / "client-0").iterdir()) == [
        "predictions",
        "round-0001",
        "round-0002",
    ]
    for client in resumed.clients:  # each client keeps its test predictions on its side
        folder = states / f"client-{client.client_id}" / "predictions"
        # the first run's final evaluation, after round 1, then the resumed run's
        assert sorted(p.name for p in folder.iterdir()) == ["round-0001.jsonl", "round-0002.jsonl"]
        lines = (folder / "round-0002.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == client.n_test == len({r["prompt_id"] for r in rows})
        mean = statistics.fmean(r["rouge_l"] for r in rows)
        assert mean == pytest.approx(client.rouge_l, abs=0.01)
        assert all(r["reference"] and "prediction" in r for r in rows)
    first, last = straight.rouge_per_round  # every client's score after each round
    assert last.clients == {str(c.client_id): c.rouge_l for c in straight.clients}
    assert set(first.clients) == set(last.clients)
    assert first.mean_rouge_l == pytest.approx(statistics.fmean(first.clients.values()))
    assert not list((tmp_path / "resumed").glob("**/.*"))  # no lock or temporary file left
    assert [p.round for p in straight.rouge_per_round] == [1, 2]
    assert straight.flops_ratio > 1 and straight.mean_ppl_increase > -1
    for client in straight.clients:
        assert client.categories and client.n_train > 0 and client.n_test > 0
        assert set(client.knowledge.heldout_ppl) == set(client.knowledge.heldout_ppl_base)
        for score in (client.knowledge.mmlu, client.knowledge.mmlu_base):
            assert score.questions == 4  # 2 of each topic after its 5 few-shot examples
            assert 0 < score.correct_probability < 1 and score.accuracy in (0, 0.25, 0.5, 0.75, 1)
        final, base = client.routing.final.layers, client.routing.base.layers
        assert all(len(layer.gate_means) == 1 for layer in final)
        assert all(layer.gate_means == [] for layer in base)
        assert (
            set(client.graft_losses) == set(client.grafted_experts) == {str(v.layer) for v in final}
        )
        for layer, losses in client.graft_losses.items():  # 'top' grafts the lowest-loss expert
            assert client.grafted_experts[layer] == [losses.index(min(losses))]
    assert len(list((tmp_path / "cache" / "measures").glob("*-mmlu-2/value.json"))) == 1  # base
    trained = list((tmp_path / "straight").glob("clients/*/measures/*-trained-*-mmlu-2/value.json"))
    assert len(trained) == len(straight.clients)  # one personalised model each
    assert all(c.knowledge.mmlu is None for c in resumed.clients)
    for path in (tmp_path / "straight" / CHECKPOINT_DIR).glob("*.safetensors"):
        names = load_file(path).keys()
        assert not any(w in n for n in names for w in ("grafted", "experts", "gate.weight"))


@pytest.mark.parametrize(("method", "mu"), [("fedavg", 0.0), ("fedprox", 0.3)])
def test_rounds_record_the_proximal_mu_each_client_used(
    tmp_path, dolly_file, random_model, method, mu
):
    common = ["--model", str(random_model), "--data", str(dolly_file), "--rounds", "2"]
    run(tmp_path, *common, "--method", method, "--proximal-mu", "0.3", "--local-steps", "1")
    rounds = read_rounds(tmp_path / ROUNDS_FILE)
    used = [client.proximal_mu for record in rounds for client in record.clients]
    assert used == [mu] * 4


def test_clients_that_share_one_model_measure_its_knowledge_once(
    tmp_path, dolly_file, random_model, monkeypatch
):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    fake_mmlu(tmp_path / "cache")
    common = ["--model", str(random_model), "--data", str(dolly_file), "--rounds", "1"]
    results = run(tmp_path / "run", *common, "--method", "fedavg", "--mmlu-per-topic", "2")
    measures = tmp_path / "run" / "clients"
    assert len(list(measures.glob("*/measures/*-trained-*-mmlu-2/value.json"))) == 1  # for both
    assert len({json.dumps(to_plain(c.knowledge)) for c in results.clients}) == 1
    assert not list(tmp_path.glob("**/.lock"))


def test_a_hundred_clients_train_ten_per_round_and_keep_their_state_on_disk(tmp_path, random_model):
    import json

    data = tmp_path / "many.jsonl"
    rows = [
        {"instruction": f"Say word {i}.", "input": "", "output": f"word {i}"} for i in range(500)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--model", str(random_model), "--data", str(data),
            "--split", "iid", "--clients", "100", "--fraction-train", "0.1", "--rounds", "2",
            "--local-steps", "1", "--batch-size", "2", "--max-test", "1",
            "--max-new-tokens", "2", "--max-length", "512"]  # fmt: skip
    assert main(argv) == 0
    rounds = read_rounds(out / ROUNDS_FILE)
    assert [len(r.clients) for r in rounds] == [10, 10]
    phases = {"startup", "load", "restore", "compute", "save"}
    assert all(set(c.seconds) == phases for r in rounds for c in r.clients)
    results = read_results(out / RESULTS_FILE)
    assert len(results.clients) == 100
    trained = {c.client_id for r in rounds for c in r.clients}
    on_disk = {int(p.name.split("-")[1]) for p in out.glob("clients/*/client-*")}
    assert trained <= on_disk  # every trained client's personal state is on disk


LOOPBACK = ("127.", "::1", "::ffff:127.")


def listening_sockets(root: psutil.Process) -> dict[str, set[str]]:
    """Every listening TCP/UDP address of ``root``'s process tree, by process name."""
    found: dict[str, set[str]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            name = process.name()
            sockets = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for socket in sockets:
            if socket.status in (psutil.CONN_LISTEN, psutil.CONN_NONE) and socket.laddr:
                found.setdefault(name, set()).add(socket.laddr.ip)
    return found


def test_a_running_simulation_listens_on_loopback_only(tmp_path, dolly_file, random_model):
    command = [
        sys.executable,
        "-m",
        "flexmoe",
        "run",
        "--out",
        str(tmp_path / "run"),
        *SMALL,
        "--model",
        str(random_model),
        "--data",
        str(dolly_file),
        "--rounds",
        "3",
    ]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[str, set[str]] = {}
    while run.poll() is None:
        for name, addresses in listening_sockets(psutil.Process(run.pid)).items():
            seen.setdefault(name, set()).update(addresses)
        time.sleep(0.3)
    assert run.returncode == 0
    assert {"gcs_server", "raylet"} <= set(seen) and len(seen) >= 3  # Ray's daemons and workers
    outside = {n: ips for n, ips in seen.items() if not all(ip.startswith(LOOPBACK) for ip in ips)}
    assert not outside, f"listening off loopback: {outside}"


def test_a_private_run_reports_the_privacy_it_spent(tmp_path, dolly_file, random_model, capsys):
    common = ["--model", str(random_model), "--data", str(dolly_file), "--rounds", "2"]
    private = ["--dp-noise-multiplier", "1.0", "--dp-clipping-norm", "0.5", "--dp-delta", "1e-4"]
    results = run(tmp_path / "private", *common, *private)
    spent = [r.dp_epsilon for r in read_rounds(tmp_path / "private" / ROUNDS_FILE)]
    assert 0 < spent[0] < spent[1] == results.privacy.epsilon  # it adds up, round by round
    assert (results.privacy.noise_multiplier, results.privacy.delta) == (1.0, 1e-4)
    once = [*common[:-1], "1", *private]  # one round, then resumed for the second
    run(tmp_path / "resumed", *once)
    resumed = run(tmp_path / "resumed", "--resume", str(tmp_path / "resumed"), "--rounds", "2")
    assert resumed.privacy.epsilon == pytest.approx(spent[1])  # the accountant resumed too
    assert main(["run", "--out", str(tmp_path / "x"), *common, "--dp-noise-multiplier", "1"]) == 2
    assert "needs a dp-clipping-norm" in capsys.readouterr().err
    tolerant = [*private, "--min-updates", "1"]  # the noise is calibrated to every client
    assert main(["run", "--out", str(tmp_path / "z"), *common, *tolerant]) == 2
    assert "needs every sampled client's update" in capsys.readouterr().err
    robust = ["--aggregation", "median", "--dp-clipping-norm", "0.5"]
    assert main(["run", "--out", str(tmp_path / "y"), *common, *robust]) == 2
    assert "accounted for FedAvg's mean" in capsys.readouterr().err


def test_clients_that_train_the_whole_model_run_one_at_a_time_on_every_core(monkeypatch):
    """Each such client holds a trainable copy of the model with its gradients and AdamW
    moments; two at once exhausted a 23 GB machine on smol-moe."""
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    cpu = Placement.resolve("cpu", "float32")
    full, lora = Settings.of(method="fedavg-full"), Settings.of(method="flex")
    assert simulated_threads(full) == 6 and simulated_threads(lora) == 1
    assert client_resources(cpu, simulated_threads(full)) == {"num_cpus": 6, "num_gpus": 0.0}
    assert client_resources(cpu, simulated_threads(lora)) == {"num_cpus": 1, "num_gpus": 0.0}


def test_a_resume_refuses_a_client_whose_state_is_lost_unless_told_to_regraft_it(
    tmp_path, dolly_file, random_model, capsys
):
    out = tmp_path / "run"
    common = ["--model", str(random_model), "--data", str(dolly_file)]
    run(out, *common, "--rounds", "1")
    lost = out / "clients" / read_checkpoint(out).run_id / "client-1"
    shutil.rmtree(lost)
    capsys.readouterr()
    resume = ["run", "--resume", str(out), *SMALL, *common, "--rounds", "2"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "personal state of client 1" in err
    assert str(lost / "round-0001") in err and "--regraft 1" in err
    assert read_checkpoint(out).round == 1  # refused before any round
    assert main([*resume, "--regraft", "0,1"]) == 2  # client 0 still has its state
    assert "name only clients whose state is missing" in capsys.readouterr().err
    resumed = run(out, "--resume", str(out), *common, "--rounds", "2", "--regraft", "1")
    assert resumed.rounds == 2 and resumed.regrafted == {"1": 2}


def test_a_client_that_cannot_write_fails_the_run_in_one_line_and_logs_its_traceback(
    tmp_path, dolly_file, random_model, capsys
):
    out = tmp_path / "run"
    common = ["--model", str(random_model), "--data", str(dolly_file)]
    run(out, *common, "--rounds", "1")
    predictions = out / "clients" / read_checkpoint(out).run_id / "client-1" / "predictions"
    shutil.rmtree(predictions)
    predictions.write_text("a file where the client keeps its predictions")
    capsys.readouterr()
    assert main(["run", "--resume", str(out), *SMALL, *common, "--rounds", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("flexmoe: error:")]
    assert f"client 1, round 2: {predictions}: File exists (traceback in " in line
    log = Path(line.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in log.read_text()
    log.unlink()


def test_a_simulation_on_cuda_n_gives_ray_gpu_n_alone_and_its_actors_call_it_cuda(monkeypatch):
    """No GPU here: what Ray would see and what its actors name, for each device a run asks."""
    import os

    from flexmoe.federated.client_app import actor_device
    from flexmoe.federated.simulation import CUDA_VISIBLE, visible_gpus

    assert [actor_device(d) for d in ("cuda:3", "cuda", "cpu")] == ["cuda", "cuda", "cpu"]
    one_gpu = Placement(torch.device("cuda", 1), torch.bfloat16)
    assert client_resources(one_gpu, 1) == {"num_cpus": os.cpu_count(), "num_gpus": 1.0}
    monkeypatch.setenv(CUDA_VISIBLE, "4,5,6")
    with visible_gpus("cuda:1"):
        assert os.environ[CUDA_VISIBLE] == "5"
    assert os.environ[CUDA_VISIBLE] == "4,5,6"
    with visible_gpus("cpu"):
        assert os.environ[CUDA_VISIBLE] == "4,5,6"
    refused = pytest.raises(FlexMoEError, match="'cuda:3' is not available: 3 CUDA devices")
    with refused, visible_gpus("cuda:3"):
        pass
