"""One base model per client process: loaded once, lent round by round, returned pristine."""

import pytest
import torch
from safetensors.torch import load_file

from flexmoe.client import ClientWorker
from flexmoe.client.base_models import BASE_MODELS, BaseModels
from flexmoe.errors import FlexMoEError
from flexmoe.federated.federation import initial_arrays
from flexmoe.federated.records import arrays_to_state
from flexmoe.flex.model import PERSONAL_WEIGHTS, FlexModel
from flexmoe.hardware import Placement
from flexmoe.methods import get_method
from flexmoe.settings import Settings

CPU = Placement.resolve("cpu", "float32")


def settings(model, data, **overrides) -> Settings:
    small = dict(clients=2, rounds=2, local_steps=2, batch_size=4, max_length=512, device="cpu")
    return Settings.of(model=str(model), data=str(data), **{**small, **overrides})


def global_state(config: Settings) -> dict[str, torch.Tensor]:
    return arrays_to_state(initial_arrays(config, get_method(config.method)))


def test_the_base_loads_once_and_comes_back_bit_for_bit(random_model):
    models = BaseModels()
    with models.lend(str(random_model), CPU, trains_weights=False) as base:
        pristine = {n: p.detach().clone() for n, p in base.state_dict().items()}
        flex = FlexModel(base)
        torch.nn.init.normal_(next(p for p in flex.model.parameters() if p.requires_grad))
        flex.unload()
    with models.lend(str(random_model), CPU, trains_weights=False) as again:
        assert again is base
        assert again.state_dict().keys() == pristine.keys()
        assert all(torch.equal(v, pristine[k]) for k, v in again.state_dict().items())
        assert not any(p.requires_grad for p in again.parameters())
    assert models.loads == 1


def test_a_base_whose_weights_were_trained_is_loaded_afresh(random_model):
    models = BaseModels()
    with models.lend(str(random_model), CPU, trains_weights=True) as base:
        torch.nn.init.zeros_(next(base.parameters()))
    with models.lend(str(random_model), CPU, trains_weights=False) as fresh:
        assert fresh is not base and next(fresh.parameters()).abs().sum() > 0
    assert models.loads == 2


def test_a_base_returned_with_adapters_on_is_refused_and_dropped(random_model):
    models = BaseModels()
    refused = pytest.raises(FlexMoEError, match=r"adapters still on; call FlexModel.unload\(\)")
    with refused, models.lend(str(random_model), CPU, trains_weights=False) as base:
        FlexModel(base)
    with models.lend(str(random_model), CPU, trains_weights=False) as fresh:
        assert fresh is not base
    twice = [models.lend(str(random_model), CPU, False) for _ in range(2)]
    with pytest.raises(FlexMoEError, match="already lent"), twice[0], twice[1]:
        pass


def test_a_model_folder_changed_on_disk_is_loaded_again(tmp_path, random_model):
    import shutil

    folder = shutil.copytree(random_model, tmp_path / "model")
    models = BaseModels()
    with models.lend(str(folder), CPU, False):
        pass
    (folder / "config.json").touch()
    with models.lend(str(folder), CPU, False):
        pass
    assert models.loads == 2


def run_rounds(config: Settings, root, order, isolated: bool) -> dict:
    """Train ``order``'s (method, client, round) steps; ``isolated`` drops the base between."""
    workers, losses = {}, {}
    for method, client, round_ in order:
        key = (method, client)
        if key not in workers:
            workers[key] = ClientWorker(
                config.updated({"method": method}), client, root / method / str(client)
            )
        if isolated:
            BASE_MODELS.drop()
        worker = workers[key]
        shared = global_state(worker.settings)
        losses[(method, client, round_)] = worker.train(round_, shared).train_loss
    return losses


@pytest.mark.slow
def test_clients_and_methods_sharing_a_process_never_leak_into_each_other(
    tmp_path, random_model, dolly_file
):
    """Interleaved on one kept base, every client's round is what it is on a base of its own."""
    config = settings(random_model, dolly_file)
    order = [
        ("flex", 0, 1), ("fedsa-lora", 1, 1), ("flex", 1, 1), ("fedavg-full", 0, 1),
        ("flex", 0, 2), ("fedsa-lora", 1, 2), ("flex", 1, 2), ("fedavg-full", 0, 2),
    ]  # fmt: skip
    shared = run_rounds(config, tmp_path / "shared", order, isolated=False)
    alone = run_rounds(config, tmp_path / "alone", order, isolated=True)
    assert shared == alone
    for method, client in {(m, c) for m, c, _ in order}:
        kept = load_file(
            tmp_path / "shared" / method / str(client) / "round-0002" / PERSONAL_WEIGHTS
        )
        fresh = load_file(
            tmp_path / "alone" / method / str(client) / "round-0002" / PERSONAL_WEIGHTS
        )
        assert kept.keys() == fresh.keys()
        assert all(torch.equal(kept[k], fresh[k]) for k in kept), (method, client)


def test_a_kept_base_costs_no_load_after_the_first_round(tmp_path, random_model, dolly_file):
    config = settings(random_model, dolly_file)
    BASE_MODELS.drop()
    worker = ClientWorker(config, 0, tmp_path)
    first = worker.train(1, global_state(config)).seconds
    second = worker.train(2, global_state(config)).seconds
    assert set(first) == {"load", "restore", "compute", "save"}
    assert first["load"] > 0 and second["load"] < first["load"] / 10


def test_full_fine_tuning_is_evaluated_beside_its_base_with_one_model_loaded(
    tmp_path, random_model, dolly_file, monkeypatch
):
    from transformers import AutoModelForCausalLM

    config = settings(random_model, dolly_file, method="fedavg-full")
    BASE_MODELS.drop()
    worker = ClientWorker(config, 0, tmp_path)
    trained = worker.train(1, global_state(config)).shared
    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    evaluation = worker.evaluate(1, trained, detailed=True)
    assert len(loads) == 1  # the pristine base, measured, then the trained weights put on it
    knowledge = evaluation.diagnostics.knowledge
    assert knowledge.heldout_ppl.keys() == knowledge.heldout_ppl_base.keys()
    assert knowledge.heldout_ppl != knowledge.heldout_ppl_base  # the trained model moved
    assert set(evaluation.seconds) >= {"answer", "test_loss", "diagnostics"}
