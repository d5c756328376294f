"""Devices and dtypes: bfloat16 on the CPU end to end, float32 adapters, one-line errors."""

import pytest
import torch

from flexmoe.cli import main
from flexmoe.data import IGNORE_INDEX
from flexmoe.errors import FlexMoEError
from flexmoe.flex.graft import grafted_blocks
from flexmoe.flex.model import FlexModel
from flexmoe.flex.roles import Role
from flexmoe.hardware import Placement, resolve_device
from flexmoe.models.loading import load_model
from flexmoe.settings import Settings
from flexmoe.training import mean_loss, train_steps
from tests.tiny_models import random_batches

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def labelled(batches):
    return [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE_INDEX)}
            for b in batches]  # fmt: skip


@no_cuda
def test_a_device_this_machine_lacks_is_one_line_naming_the_fix():
    with pytest.raises(FlexMoEError, match="sees no CUDA device here; use --device cpu") as error:
        resolve_device("cuda:1")
    assert "\n" not in str(error.value)


@no_cuda
def test_flexmoe_run_on_cuda_without_one_fails_in_one_line(tmp_path, capsys):
    assert main(["run", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "flexmoe: error: device 'cuda' is not available: torch "
        f"{torch.__version__} sees no CUDA device here; use --device cpu or auto"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [("device", "gpu", "device must be auto, cpu"), ("dtype", "fp8", "dtype must be one of")],
)
def test_bad_device_and_dtype_names_are_refused_with_the_settings(setting, value, message):
    with pytest.raises(FlexMoEError, match=message):
        Settings().updated({setting: value})


def test_auto_is_float32_on_a_cpu_and_bfloat16_parses():
    if not torch.cuda.is_available():
        assert Placement.resolve() == Placement(torch.device("cpu"), torch.float32)
    assert Placement.resolve("cpu", "bfloat16").dtype is torch.bfloat16
    assert Settings().updated({"gradient-checkpointing": "true"}).train.gradient_checkpointing


def bf16_and_fp32(folder):
    return [load_model(folder, Placement.resolve("cpu", d))[0] for d in ("bfloat16", "float32")]


def test_bfloat16_grafts_trains_evaluates_and_reloads_close_to_float32(tmp_path, random_model):
    batches = labelled(random_batches(4))
    results = {}
    for base in bf16_and_fp32(random_model):
        frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
        torch.manual_seed(0)
        flex, choices = FlexModel.graft(base, batches)
        trainable = {n: p for n, p in flex.model.named_parameters() if p.requires_grad}
        assert {p.dtype for p in trainable.values()} == {torch.float32}  # master weights
        losses = train_steps(flex.model, iter(batches * 2), 6, lr=1e-2)
        saved = flex.save_pretrained(tmp_path / str(base.dtype), include_shared=True)
        test_loss = mean_loss(flex, batches)
        personal = flex.personal_state_dict()
        base = flex.unload()
        for name, value in base.named_parameters():  # the frozen base, bit for bit
            assert torch.equal(value, frozen[name]), name
        reloaded = FlexModel.from_pretrained(base, saved)
        assert all(torch.equal(v, personal[k]) for k, v in reloaded.personal_state_dict().items())
        assert mean_loss(reloaded, batches) == pytest.approx(test_loss, abs=1e-6)
        results[base.dtype] = ([c.chosen for c in choices], losses, test_loss)
    (chosen_16, losses_16, test_16), (chosen_32, losses_32, test_32) = results.values()
    assert chosen_16 == chosen_32
    assert losses_16[-1] < losses_16[0]
    assert losses_16 == pytest.approx(losses_32, rel=0.02)
    assert test_16 == pytest.approx(test_32, rel=0.02)


def test_bfloat16_generation_scores_like_float32(random_model):
    from flexmoe.data import InstructionExample
    from flexmoe.evaluation.generation import generate_answers

    examples = [InstructionExample("Name a colour.", "", "Red")] * 2
    answers = []
    for base in bf16_and_fp32(random_model):
        flex = FlexModel(base)
        _, tokenizer = load_model(random_model)
        answers.append(generate_answers(flex, tokenizer, examples, 4, 64, 2))
        assert flex.state_of(Role.SHARED)  # LoRA on, in float32, beside a bfloat16 base
    assert all(isinstance(a, str) for pair in answers for a in pair)


def test_gradient_checkpointing_trains_the_same_steps(random_model):
    batches = labelled(random_batches(3))
    losses = []
    for checkpointing in (False, True):
        base, _ = load_model(random_model)
        torch.manual_seed(0)
        flex = FlexModel(base)
        torch.manual_seed(1)
        losses.append(
            train_steps(flex.model, iter(batches), 3, 1e-2, gradient_checkpointing=checkpointing)
        )
        assert not flex.model.is_activation_checkpointing
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_a_half_precision_cpu_run_without_fast_kernels_is_warned_of(capsys):
    from flexmoe.cli.options import checked_placement

    placement = checked_placement("cpu", "bfloat16")
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert placement.slow is None
    else:
        assert "no fast matrix kernel" in capsys.readouterr().err
    assert Placement.resolve("cpu", "float32").slow is None


def test_bfloat16_computes_float32_weights_in_bfloat16_and_keeps_trained_ones_float32():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    bf16 = Placement.resolve("cpu", "bfloat16")
    with bf16.autocast():
        assert layer(x).dtype is torch.bfloat16
    with Placement.resolve("cpu", "float32").autocast():
        assert layer(x).dtype is torch.float32
    assert bf16.for_trained_weights() == Placement.resolve("cpu", "float32")


def test_a_cpu_model_loads_with_the_eager_experts(random_model):
    model, _ = load_model(random_model, Placement.resolve("cpu", "float32"))
    assert model.config._experts_implementation == "eager"


def test_mixed_precision_trains_float32_adapters_on_a_bfloat16_base_like_float32(random_model):
    batches = labelled(random_batches(3))
    losses = {}
    for dtype in ("bfloat16", "float32"):
        placement = Placement.resolve("cpu", dtype)
        base, _ = load_model(random_model, placement)
        torch.manual_seed(0)
        flex = FlexModel(base)
        with placement.autocast():
            losses[dtype] = train_steps(flex.model, iter(batches * 2), 6, lr=1e-2)
        trained = [p for p in flex.model.parameters() if p.requires_grad]
        assert {p.dtype for p in trained} == {torch.float32}
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.03)


def test_grafted_experts_hold_float32_weights_and_compute_in_bfloat16_under_autocast(
    random_model,
):
    placement = Placement.resolve("cpu", "bfloat16")
    base, _ = load_model(random_model, placement)
    batches = random_batches(1)
    with placement.autocast():
        flex, _ = FlexModel.graft(base, batches)
    block = grafted_blocks(flex.model)[0]
    computed = []
    for module in (block.grafted_experts[0].down_proj, block.grafted_gates[0]):
        module.register_forward_hook(lambda _m, _i, out: computed.append(out.dtype))
    with placement.autocast(), torch.no_grad():
        flex(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    assert computed == [torch.bfloat16, torch.bfloat16]  # the base's precision, not float32's
    weights = [*block.grafted_experts.parameters(), *block.grafted_gates.parameters()]
    assert {p.dtype for p in weights} == {torch.float32}  # master weights for the updates


def test_fedavg_full_trains_float32_weights_under_bfloat16(tmp_path, random_model, dolly_file):
    from flexmoe.client import ClientWorker
    from flexmoe.federated.federation import initial_arrays
    from flexmoe.federated.records import arrays_to_state

    config = Settings.of(
        model=str(random_model), data=str(dolly_file), method="fedavg-full", clients=2,
        rounds=1, local_steps=1, batch_size=2, device="cpu", dtype="bfloat16",
    )  # fmt: skip
    worker = ClientWorker(config, 0, tmp_path)
    shared = arrays_to_state(initial_arrays(config, config.chosen_method()))
    with worker.model_for_round(1, shared) as model:
        weights = {p.dtype for p in model.model.parameters() if p.requires_grad}
    assert weights == {torch.float32}  # updates of 1e-5 would round away in bfloat16


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2_moe", "mixtral"])
def test_routers_route_as_in_float32_under_bfloat16_autocast(model_type):
    from flexmoe.flex.moe import exact_routers, find_moe_blocks
    from tests.tiny_models import build_model

    model = build_model(model_type)
    x = torch.randn(64, model.config.hidden_size)
    view = find_moe_blocks(model)[0]
    expected = view.router(x)
    exact_routers(model)
    with Placement.resolve("cpu", "bfloat16").autocast():
        routed = view.router(x)
        assert view.router_logits(x).dtype is torch.float32
    assert all(torch.equal(a, b) for a, b in zip(routed, expected, strict=True))
    assert len(find_moe_blocks(model)) >= 1  # the wrapped routers still pass the rule's check
