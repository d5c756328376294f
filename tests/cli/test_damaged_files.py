"""Every kind of file flexmoe reads, damaged in several ways, is one `flexmoe: error:` line.

Model weights and config, adapter weights and config, checkpoints, data and results files are
truncated, emptied, deleted, byte-flipped, or edited to lose a key, hold a wrong type or an
index out of range; each is read by the command a user would run on it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from benchmarks import report
from flexmoe.cli import main
from flexmoe.errors import FlexMoEError
from flexmoe.results import Checkpoint, write_checkpoint
from flexmoe.settings import Settings

Damage = Callable[[Path], None]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def delete(path: Path) -> None:
    path.unlink()


def flip(path: Path) -> None:
    """Invert the first bytes (a safetensors header's length, a JSON file's opening)."""
    data = bytearray(path.read_bytes())
    for i in range(min(12, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edit(change: Callable[[dict], None]) -> Damage:
    def damage(path: Path) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return damage


BYTES = {"truncate": truncate, "empty": empty, "delete": delete, "flip": flip}


def assert_one_error_line(capsys, argv: list[str], damaged: Path, command=main) -> str:
    """One error line that names the damaged file or the folder holding it."""
    assert command(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexmoe: error:") and err.count("\n") == 1, err
    assert str(damaged.parent) in err, err
    return err


def damaged_copy(source: Path, target: Path, name: str, damage: Damage) -> Path:
    shutil.copytree(source, target)
    damage(target / name)
    return target


MODEL_DAMAGE = [
    *((f"model.safetensors-{k}", "model.safetensors", d) for k, d in BYTES.items()),
    *((f"config.json-{k}", "config.json", d) for k, d in BYTES.items()),
    ("config.json-no-type", "config.json", edit(lambda c: c.pop("model_type"))),
    ("config.json-wrong-type", "config.json", edit(lambda c: c.update(num_hidden_layers="x"))),
    ("config.json-fewer-experts", "config.json", edit(lambda c: c.update(num_experts=2))),
    ("tokenizer.json-truncate", "tokenizer.json", truncate),
]


@pytest.mark.parametrize(("case", "name", "damage"), MODEL_DAMAGE, ids=[c[0] for c in MODEL_DAMAGE])
def test_damaged_model_folder(capsys, tmp_path, olmoe_dir, case, name, damage):
    model = damaged_copy(olmoe_dir, tmp_path / "model", name, damage)
    assert_one_error_line(capsys, ["info", str(model)], model / name)


WEIGHT_DAMAGE = [(k, d) for k, d in BYTES.items()]


@pytest.mark.parametrize(("case", "damage"), WEIGHT_DAMAGE, ids=[c[0] for c in WEIGHT_DAMAGE])
def test_a_run_refuses_damaged_weights_before_any_client_starts(capsys, tmp_path, olmoe_dir,
                                                                case, damage):  # fmt: skip
    """The run's pre-flight builds the model on the meta device, and reads the weight files'
    headers alone."""
    model = damaged_copy(olmoe_dir, tmp_path / "model", "model.safetensors", damage)
    argv = ["run", "--model", str(model), "--data", "dolly", "--out", str(tmp_path / "run")]
    err = assert_one_error_line(capsys, argv, model / "model.safetensors")
    assert "no weights" in err if case == "delete" else "cannot load a causal LM" in err
    assert not (tmp_path / "run" / "clients").exists()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, olmoe_dir) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    data = folder / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Repeat: apple.", "output": "apple"}) + "\n")
    assert (
        main(["graft", "--model", str(olmoe_dir), "--data", str(data), "--out", str(folder / "a")])
        == 0
    )
    return folder / "a"


def set_source(expert: int) -> Damage:
    return edit(lambda c: c["grafts"][0].update(source_experts=[expert]))


ADAPTER_DAMAGE = [
    *((f"personal-{k}", "personal.safetensors", d) for k, d in BYTES.items()),
    *((f"config-{k}", "flexmoe_config.json", d) for k, d in BYTES.items()),
    ("config-no-grafts", "flexmoe_config.json", edit(lambda c: c.pop("grafts"))),
    ("config-unknown-key", "flexmoe_config.json", edit(lambda c: c["config"].update(colour=1))),
    ("config-wrong-type", "flexmoe_config.json", edit(lambda c: c.update(grafts=3))),
    ("config-expert-99", "flexmoe_config.json", set_source(99)),
    ("config-other-expert", "flexmoe_config.json", set_source(5)),
    ("config-neuron-out-of-range", "flexmoe_config.json",
     edit(lambda c: c["grafts"][0]["neurons"][0].append(10_000))),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "name", "damage"), ADAPTER_DAMAGE, ids=[c[0] for c in ADAPTER_DAMAGE]
)
def test_damaged_adapter(capsys, tmp_path, olmoe_dir, adapter, case, name, damage):
    source = json.loads((adapter / "flexmoe_config.json").read_text())
    assert source["grafts"][0]["source_experts"] != [5]  # so that 'other-expert' is an edit
    damaged = damaged_copy(adapter, tmp_path / "adapter", name, damage)
    argv = ["info", str(olmoe_dir), "--adapter", str(damaged)]
    err = assert_one_error_line(capsys, argv, damaged / name)
    if case == "config-other-expert":
        assert "the config was edited or belongs to other weights" in err


@pytest.fixture
def run_folder(tmp_path, random_model, dolly_file) -> tuple[Path, list[str]]:
    """A run stopped after round 1, with the settings to resume it."""
    config = Settings.of(model=str(random_model), data=str(dolly_file), clients=2, rounds=2)
    out = tmp_path / "run"
    write_checkpoint(out, Checkpoint(run_id="abc", config=config.to_record(), round=1))
    arrays = {"w": np.zeros(3, dtype=np.float32)}
    (out / "checkpoints").mkdir()
    save_file(arrays, str(out / "checkpoints" / "shared-round-0001.safetensors"))
    save_file(arrays, str(out / "checkpoints" / "strategy-round-0001.safetensors"))
    return out, ["run", "--resume", str(out)]


CHECKPOINT_DAMAGE = [
    *((f"checkpoint.json-{k}", "checkpoint.json", d) for k, d in BYTES.items() if k != "delete"),
    ("checkpoint.json-no-config", "checkpoint.json", edit(lambda c: c.pop("config"))),
    ("checkpoint.json-empty-config", "checkpoint.json", edit(lambda c: c.update(config={}))),
    (
        "checkpoint.json-bad-random-state",
        "checkpoint.json",
        edit(lambda c: c.update(random_state=[1])),
    ),
    ("checkpoint.json-wrong-type", "checkpoint.json", edit(lambda c: c.update(round="one"))),
    ("checkpoint.json-bad-settings", "checkpoint.json", edit(lambda c: c["config"].update(lr=-1))),
    *((f"shared-{k}", "checkpoints/shared-round-0001.safetensors", d) for k, d in BYTES.items()),
    ("strategy-truncate", "checkpoints/strategy-round-0001.safetensors", truncate),
]


@pytest.mark.parametrize(
    ("case", "name", "damage"), CHECKPOINT_DAMAGE, ids=[c[0] for c in CHECKPOINT_DAMAGE]
)
def test_damaged_checkpoint(capsys, run_folder, case, name, damage):
    out, argv = run_folder
    damage(out / name)
    assert_one_error_line(capsys, argv, out / name)


DATA_DAMAGE = [
    ("truncate", truncate),
    ("empty", empty),
    ("delete", delete),
    ("flip", flip),
    ("wrong-type", lambda p: p.write_text('{"instruction": "Add.", "output": 3}\n')),
    ("not-an-object", lambda p: p.write_text("[1, 2]\n")),
]


@pytest.mark.parametrize(("case", "damage"), DATA_DAMAGE, ids=[c[0] for c in DATA_DAMAGE])
def test_damaged_data_file(capsys, tmp_path, olmoe_dir, alpaca_file, case, damage):
    damage(alpaca_file)
    argv = ["graft", "--model", str(olmoe_dir), "--data", str(alpaca_file), "--out"]
    assert_one_error_line(capsys, [*argv, str(tmp_path / "out")], alpaca_file)


RESULTS_DAMAGE = [
    *((f"results-{k}", "results.json", d) for k, d in BYTES.items() if k != "delete"),
    ("results-no-clients", "results.json", edit(lambda r: r.pop("clients"))),
    ("results-wrong-type", "results.json", edit(lambda r: r.update(mean_rouge_l="high"))),
    ("results-client-not-a-record", "results.json", edit(lambda r: r.update(clients=[3]))),
    ("rounds-truncate", "rounds.json", truncate),
    ("rounds-wrong-type", "rounds.json", lambda p: p.write_text('{"round": 1}')),
]


@pytest.mark.parametrize(
    ("case", "name", "damage"), RESULTS_DAMAGE, ids=[c[0] for c in RESULTS_DAMAGE]
)
def test_damaged_results(capsys, tmp_path, case, name, damage):
    from tests.benchmarks.fakes import fake_results, train_losses, write_run

    folder = write_run(tmp_path / "run", fake_results("flex", 0, [10.0]), train_losses(1.0))
    damage(folder / name)
    assert_one_error_line(capsys, [str(tmp_path)], folder / name, report.main)


def test_a_runs_preflight_reads_no_weights(monkeypatch, tmp_path, olmoe_dir):
    from transformers import AutoModelForCausalLM

    from flexmoe.federated.simulation import check_run

    def refuse(*args, **kwargs):
        raise AssertionError("the pre-flight loaded the weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    sharded = shutil.copytree(olmoe_dir, tmp_path / "sharded")
    index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FlexMoEError, match=r"lacks 1 weight shard.*model-00002-of-00002"):
        check_run(Settings.of(model=str(sharded), data="dolly"))
    report = check_run(Settings.of(model=str(olmoe_dir), data="dolly", experts_per_layer=2))
    assert report  # the data's truncation report, per category
    with pytest.raises(FlexMoEError, match="experts-per-layer 99 is more than the 6 experts"):
        check_run(Settings.of(model=str(olmoe_dir), data="dolly", experts_per_layer=99))


def test_full_fine_tuning_that_cannot_fit_the_device_is_refused_before_it_starts(
    monkeypatch, olmoe_dir
):
    from flexmoe.federated.simulation import check_run
    from flexmoe.hardware import Placement

    settings = Settings.of(model=str(olmoe_dir), data="dolly", method="fedavg-full")
    check_run(settings)  # a tiny model fits this host
    check_run(settings.updated({"method": "flex"}))
    # a device with 1 MB, as a GPU too small for the model would be
    monkeypatch.setattr(Placement, "memory_bytes", property(lambda self: 10**6))
    check_run(settings.updated({"method": "flex"}))  # adapters: not checked
    with pytest.raises(
        FlexMoEError,
        match=r"needs about 0\.\d GB at 4 x 512 tokens a forward .* 0\.0 GB of cpu; set "
        "micro-batch-size below 4, a smaller max-length",
    ):
        check_run(settings)
    with pytest.raises(FlexMoEError, match=r"at 1 x 512 tokens a forward .* use a smaller max"):
        check_run(settings.updated({"micro-batch-size": 1}))  # one example's activations
