"""Whole runs on Flower's simulation engine (Ray): results, checkpoints, resume, traffic."""

import shutil

import pytest
from safetensors.numpy import load_file

from flexmoe.cli import main
from flexmoe.results import (
    CHECKPOINT_DIR,
    RESULTS_FILE,
    ROUNDS_FILE,
    RunResults,
    read_checkpoint,
    read_results,
    read_rounds,
)

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


def test_resumed_run_equals_uninterrupted_run(tmp_path, dolly_file, random_model):
    common = ["--model", str(random_model), "--data", str(dolly_file)]
    straight = run(tmp_path / "straight", *common, "--rounds", "2", "--eval-every", "1")
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
    assert sorted(p.name for p in (states / "client-0").iterdir()) == ["round-0001", "round-0002"]
    assert not list((tmp_path / "resumed").glob("**/.*"))  # no lock or temporary file left
    assert [p.round for p in straight.rouge_per_round] == [1, 2]
    assert straight.flops_ratio > 1 and straight.mean_ppl_increase > -1
    for client in straight.clients:
        assert client.categories and client.n_train > 0 and client.n_test > 0
        assert set(client.knowledge.heldout_ppl) == set(client.knowledge.heldout_ppl_base)
        final, base = client.routing.final.layers, client.routing.base.layers
        assert all(len(layer.gate_means) == 1 for layer in final)
        assert all(layer.gate_means == [] for layer in base)
        assert (
            set(client.graft_losses) == set(client.grafted_experts) == {str(v.layer) for v in final}
        )
        for layer, losses in client.graft_losses.items():  # 'top' grafts the lowest-loss expert
            assert client.grafted_experts[layer] == [losses.index(min(losses))]
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
