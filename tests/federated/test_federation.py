"""The federated layer: what crosses the wire, checkpoints, resume, and errors."""

import re
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from safetensors.numpy import load_file

from flexmoe.cli import main
from flexmoe.errors import FlexMoEError
from flexmoe.federated import client_app
from flexmoe.federated.federation import initial_arrays, round_instructions
from flexmoe.federated.protocol import (
    ARRAYS,
    CONFIG,
    PROXIMAL_MU,
    SERVER_ROUND,
    EvaluateReply,
    NodeConfig,
    RoundInstructions,
    TrainReply,
    run_config_of,
)
from flexmoe.federated.records import wire_bytes
from flexmoe.methods import METHODS, get_method
from flexmoe.settings import Settings
from tests import ROOT

pytestmark = pytest.mark.usefixtures("task_identity")


def settings(model, data, **overrides) -> Settings:
    small = dict(clients=2, rounds=1, local_steps=2, batch_size=4, max_length=512)
    return Settings.of(model=str(model), data=str(data), **{**small, **overrides})


def client_reply(config: Settings, out, client: int, arrays, proximal_mu: float = 0.0):
    """Drive the real ClientApp with a real train message, the run's settings in its context.

    ``proximal_mu`` is what the FedProx strategy adds to the request (0: another strategy).
    """
    record = round_instructions(out, "test-run", 1).to_record()
    record.update({SERVER_ROUND: 1, PROXIMAL_MU: proximal_mu})  # as FedProx's strategy does
    content = RecordDict({ARRAYS: arrays, CONFIG: record})
    message = Message(content, dst_node_id=client + 1, message_type="train")
    node = NodeConfig(client, config.federation.clients).to_flat()
    run_config = run_config_of(config, str(out))
    return client_app.app(message, Context(1, client + 1, node, RecordDict(), run_config))


def train_reply(config: Settings, out) -> Message:
    """The reply of client 0 to round 1 of ``config``."""
    return client_reply(config, out, 0, initial_arrays(config, get_method(config.method)))


PRIVATE = ("grafted", "experts", "gate", "router")


@pytest.mark.parametrize(
    ("method", "expected"),
    [("flex", ".lora_"), ("fedavg", ".lora_"), ("fedsa-lora", ".lora_A."), ("local", None)],
)
def test_replies_carry_only_shared_parameters(tmp_path, random_model, dolly_file, method, expected):
    reply = train_reply(settings(random_model, dolly_file, method=method), tmp_path)
    names = list(reply.content["arrays"].keys())
    if expected is None:
        assert names == []
    else:
        assert names and all(expected in n for n in names)
        assert not any(word in n for n in names for word in PRIVATE)
    assert reply.content["metrics"]["num-examples"] > 0


def test_personal_state_stays_on_the_client(tmp_path, random_model, dolly_file):
    train_reply(settings(random_model, dolly_file), tmp_path)
    saved = list((tmp_path / "clients").rglob("personal.safetensors"))
    assert len(saved) == 1 and "client-0" in str(saved[0])
    assert all("grafted_" in name for name in load_file(saved[0]))


def test_full_fedavg_ships_the_experts(tmp_path, random_model, dolly_file):
    full = train_reply(settings(random_model, dolly_file, method="fedavg-full"), tmp_path / "a")
    flex = train_reply(settings(random_model, dolly_file), tmp_path / "b")
    assert any("experts.gate_up_proj" in n for n in full.content["arrays"])
    assert wire_bytes(flex.content) < wire_bytes(full.content)


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (["--method", "fedmagic"], "method must be one of"),
        (["--clients", "50"], "use fewer clients"),
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--model", "/"], "no config.json"),
    ],
)
def test_bad_runs_fail_early_and_clearly(
    capsys, tmp_path, random_model, dolly_file, overrides, phrase
):
    argv = [
        "run",
        "--model",
        str(random_model),
        "--data",
        str(dolly_file),
        "--out",
        str(tmp_path / "o"),
        "--max-length",
        "512",
        *overrides,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexmoe: error:") and phrase in err


def test_data_without_needed_fields_fails_clearly(capsys, tmp_path, random_model):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "completion": "there"}\n')
    argv = ["run", "--model", str(random_model), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "instruction" in capsys.readouterr().err


def test_flower_app_config_declares_every_run_setting():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = dict(pyproject["tool"]["flwr"]["app"]["config"])
    declared.pop("out-dir")
    assert Settings().updated(declared) == Settings()  # every setting, by its group's name
    tables = {name: t for name, t in declared.items() if isinstance(t, dict)}
    keys = {f"{name}.{key}" for name, table in tables.items() for key in table}
    assert set(Settings().to_run_config()) == keys | (set(declared) - set(tables))


def test_flex_uplink_is_a_small_fraction_of_full_fedavg_on_the_bundled_model(tmp_path, dolly_file):
    replies = {
        method: train_reply(
            Settings.of(
                model="tiny", data=str(dolly_file), clients=2, local_steps=1, method=method
            ),
            tmp_path / method,
        )
        for method in ("flex", "fedavg-full")
    }
    flex, full = (wire_bytes(replies[m].content) for m in ("flex", "fedavg-full"))
    assert flex <= 0.05 * full


def test_resuming_a_folder_without_a_checkpoint_fails_clearly(capsys, tmp_path):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "earlier 'flexmoe run'" in capsys.readouterr().err
    (tmp_path / "checkpoint.json").write_text("{")
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "damaged" in capsys.readouterr().err


def remember_global(strategy, arrays) -> None:
    """What ``configure_train`` records for server optimisers (it needs a live Grid to call)."""
    from flwr.serverapp.strategy import FedAvgM

    if isinstance(strategy, FedAvgM):
        strategy.current_arrays = arrays
    elif hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: a.numpy() for k, a in arrays.items()}


@pytest.mark.parametrize(
    "method",
    [
        "flex-random",
        "flex-generic",
        "fedprox",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedsa-lora",
    ],
)
def test_every_method_trains_and_aggregates(tmp_path, random_model, dolly_file, method):
    from flexmoe.federated.strategies import make_strategy, restore_strategy_state, strategy_state

    config = settings(random_model, dolly_file, method=method, proximal_mu=0.1)
    arrays = initial_arrays(config, get_method(method))
    replies = [client_reply(config, tmp_path, c, arrays) for c in range(2)]
    strategy = make_strategy(config)
    remember_global(strategy, arrays)
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert set(aggregated.keys()) == set(arrays.keys())
    before = {k: a.numpy() for k, a in arrays.items()}
    assert any((aggregated[k].numpy() != before[k]).any() for k in before)
    state = strategy_state(strategy)
    fresh = make_strategy(config)
    restore_strategy_state(fresh, state)
    assert strategy_state(fresh).keys() == state.keys()


def shared_distance(reply: Message, start) -> float:
    """Squared distance of a reply's shared parameters from where the round started."""
    arrays = reply.content["arrays"]
    return sum(float(((arrays[k].numpy() - start[k].numpy()) ** 2).sum()) for k in start)


def test_fedprox_proximal_term_pulls_the_client_toward_the_global_parameters(
    tmp_path, random_model, dolly_file
):
    config = settings(random_model, dolly_file, method="fedprox", local_steps=4)
    start = initial_arrays(config, get_method("fedprox"))
    distances = {
        mu: shared_distance(client_reply(config, tmp_path / str(mu), 0, start, mu), start)
        for mu in (0.0, 100.0)
    }
    assert 0 < distances[100.0] < 0.5 * distances[0.0]


@pytest.mark.parametrize(
    ("method", "mu"), [("fedavg", 0.0), ("flex", 0.0), ("fedadam", 0.0), ("fedprox", 0.25)]
)
def test_only_fedprox_clients_train_with_a_proximal_term(
    tmp_path, random_model, dolly_file, method, mu
):
    """The request is built by the method's own strategy, and the reply says what mu it used."""
    from flexmoe.federated.strategies import make_strategy

    config = settings(random_model, dolly_file, method=method, proximal_mu=0.25)
    arrays = initial_arrays(config, get_method(method))
    strategy = make_strategy(config)
    request = round_instructions(tmp_path, "test-run", 1).to_record()
    requests = strategy.configure_train(1, arrays, request, Nodes(config.federation.clients))
    request = next(r for r in requests if r.metadata.dst_node_id == 1)
    node = NodeConfig(0, config.federation.clients).to_flat()
    context = Context(1, 1, node, RecordDict(), run_config_of(config, str(tmp_path)))
    reply = client_app.app(request, context)
    assert TrainReply.from_message(reply).proximal_mu == mu


class Nodes:
    """The part of a Grid a strategy's configure_train uses: ``count`` connected nodes."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))


def test_every_aggregation_has_its_own_strategy_and_local_aggregates_nothing():
    from flwr.serverapp.strategy import FedAvg, FedProx

    from flexmoe.federated.strategies import STRATEGIES, make_strategy
    from flexmoe.methods import Aggregation

    assert set(STRATEGIES) == set(Aggregation) - {Aggregation.NONE}
    config = Settings.of(proximal_mu=0.5)
    for method in METHODS.values():
        strategy = make_strategy(config.updated({"method": method.name}))
        assert isinstance(strategy, FedAvg)
        assert isinstance(strategy, FedProx) == (method.aggregation is Aggregation.FEDPROX)
    assert make_strategy(config.updated({"method": "fedprox"})).proximal_mu == 0.5


def test_a_request_without_the_round_is_refused_clearly():
    from flwr.app import ConfigRecord

    message = Message(RecordDict({"config": ConfigRecord({"run-key": "r"})}), 1, "train")
    with pytest.raises(FlexMoEError, match="has no 'server-round' value"):
        RoundInstructions.from_message(message)


def test_a_diverging_client_fails_its_round_and_saves_nothing(tmp_path, random_model, dolly_file):
    config = settings(random_model, dolly_file, lr=1e30, min_lr=1e29, local_steps=3)
    reason = error_reason(train_reply(config, tmp_path))  # a reply, not a raised exception
    assert re.match(r"client 0, round 1: .*lower the learning rate", reason)
    assert not list((tmp_path / "clients").rglob("personal.safetensors"))


def test_the_server_refuses_non_finite_arrays():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from flexmoe.federated.federation import check_finite

    good = np.zeros(3, dtype=np.float32)
    check_finite(ArrayRecord({"a": Array(good)}), "an update", 1)
    bad = ArrayRecord({"a": Array(good), "b": Array(np.array([1.0, np.nan], dtype=np.float32))})
    with pytest.raises(FlexMoEError, match=r"round 2: an update holds non-finite values .* b\)"):
        check_finite(bad, "an update", 2)


@pytest.mark.parametrize("method", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimisers_step_at_the_server_learning_rate(method):
    from flexmoe.federated.strategies import make_strategy

    config = Settings.of(method=method, server_lr=0.05, lr=2e-4)
    strategy = make_strategy(config)
    assert (strategy.eta, strategy.eta_l) == (0.05, 2e-4)


def node_reply(config, out, node: dict, run_key="test-run", kind="train", detailed=False):
    """Client 0's reply to a ``kind`` request, on a SuperNode configured with ``node``."""
    record = round_instructions(out, run_key, 1, detailed).to_record()
    record.update({SERVER_ROUND: 1})
    arrays = initial_arrays(config, get_method(config.method))
    content = RecordDict({ARRAYS: arrays, CONFIG: record})
    message = Message(content, dst_node_id=1, message_type=kind)
    node = {**NodeConfig(0, config.federation.clients).to_flat(), **node}
    context = Context(1, 1, node, RecordDict(), run_config_of(config, str(out)))
    return client_app.app(message, context)


def refusal(*args, **kwargs) -> str:
    """Why the node refuses ``node_reply(*args, **kwargs)``: its error reply's reason."""
    return error_reason(node_reply(*args, **kwargs))


def error_reason(reply: Message) -> str:
    """The one line of an error reply, whose traceback log on the node it removes."""
    assert reply.has_error() and "\n" not in reply.error.reason
    log = Path(reply.error.reason.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert "Traceback (most recent call last)" in log.read_text()
    log.unlink()
    return reply.error.reason


@pytest.mark.parametrize("key", ["/tmp/evil", "../other-run", "a/b", ""])
def test_a_node_refuses_a_run_key_that_is_not_a_plain_name(tmp_path, random_model, dolly_file, key):
    config = settings(random_model, dolly_file)
    reason = refusal(config, tmp_path, {"state-dir": str(tmp_path / "node")}, key)
    assert "must be a plain name" in reason
    assert not (tmp_path / "node").exists() and not Path("/tmp/evil").exists()


def test_a_node_sets_the_least_batch_and_test_size_the_server_may_ask(
    tmp_path, random_model, dolly_file
):
    config = settings(random_model, dolly_file, batch_size=2)
    assert "batch-size of at least 4" in refusal(config, tmp_path, {})
    assert not node_reply(config, tmp_path, {"min-batch-size": 2}).has_error()
    small_test = settings(random_model, dolly_file, max_test=3)
    assert "max-test of at least 8" in refusal(small_test, tmp_path, {})


@pytest.mark.parametrize("share", [False, True])
def test_a_deployed_node_shares_diagnostics_only_when_its_config_says_so(
    tmp_path, random_model, dolly_file, share
):
    config = settings(random_model, dolly_file, max_new_tokens=2)
    node = {"share-diagnostics": share} if share else {}
    reply = EvaluateReply.from_message(
        node_reply(config, tmp_path, node, kind="evaluate", detailed=True)
    )
    assert (reply.diagnostics is not None) == share
    assert bool(reply.categories) == share


def test_a_node_with_its_own_data_file_trains_and_tests_on_all_of_it(
    tmp_path, random_model, dolly_file, alpaca_file
):
    config = settings(random_model, dolly_file, max_new_tokens=2, max_test=8)
    own = {"data": str(alpaca_file), "state-dir": str(tmp_path / "node")}
    reply = EvaluateReply.from_message(node_reply(config, tmp_path, own, kind="evaluate"))
    records = len(alpaca_file.read_text().splitlines())
    assert reply.n_train + reply.n_test == records  # the whole file, none of the run's data
    shared = EvaluateReply.from_message(node_reply(config, tmp_path, {}, kind="evaluate"))
    assert shared.n_train + shared.n_test < len(dolly_file.read_text().splitlines())


def test_a_private_runs_updates_are_clipped_to_the_norm_on_real_messages(
    tmp_path, random_model, dolly_file
):
    from flexmoe.federated.strategies import make_strategy

    def update_norm(config: Settings) -> tuple[float, int]:
        arrays = initial_arrays(config, get_method("flex"))
        strategy = make_strategy(config)
        request = next(
            m for m in strategy.configure_train(
                1, arrays, round_instructions(tmp_path, "r", 1).to_record(), Nodes(2)
            ) if m.metadata.dst_node_id == 1
        )  # fmt: skip
        context = Context(1, 1, NodeConfig(0, 2).to_flat(), RecordDict(), run_config_of(config, ""))
        reply = client_app.app(request, context)
        sent = reply.content["arrays"]
        squares = sum(((sent[k].numpy() - arrays[k].numpy()) ** 2).sum() for k in arrays)
        return float(squares**0.5), int(reply.content["metrics"]["num-examples"])

    plain = settings(random_model, dolly_file, method="flex", lr=1e-2)
    free, weight = update_norm(plain)
    assert free > 1e-3 and weight > 1
    private = plain.updated({"dp-clipping-norm": 1e-3, "dp-noise-multiplier": 1.0})
    clipped, weight = update_norm(private)
    assert clipped == pytest.approx(1e-3, rel=1e-3)  # clipped, not merely small
    assert weight == 1  # client-level DP weighs every client equally
