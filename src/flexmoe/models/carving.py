"""Carve a dense causal LM with gated MLPs into a transformers MoE checkpoint (``glm4_moe``).

A dense FFN is a mixture of experts in disguise (MoEfication, Zhang et al. 2022): on any token
only a fraction of its neurons contribute much. Each layer's neurons are split in three steps:

1. **Shared expert**: the ``shared_neurons`` neurons most often among a token's strongest
   (strength = ``|activation| x ||down column||``) stay always active, as LLaMA-MoE's residual
   experts and CMoE's shared neurons do; without them a sparse FFN loses most of its output.
2. **Routed experts**: the remaining neurons are grouped into ``experts`` equal groups by
   balanced k-means over their co-activation patterns (which tokens a neuron is strong on), so
   the neurons a token needs tend to sit in few experts.
3. **Router**: a ridge regression from the FFN input to each expert's centred log output norm,
   fitted in closed form (CMoE's analytic router), ranks the experts for every token.

Optionally (``refit``) the down projections are refitted by least squares so that the output at
the operating top-k matches the dense output on calibration text. Layers are carved in order,
each on the hidden states the already-carved layers produce (as GPTQ calibrates), so a layer's
refit corrects what the earlier layers changed.

Carving computes in float64, the norms, rotary embedding and router included (transformers runs
those in float32 whatever the input). Its discrete choices (the strong neurons, the clusters, the
experts a token uses) then depend on no float32 rounding, which differs from one CPU's BLAS to the
next, so machines make the same choices and their carved weights differ by float64 rounding only;
integer ties go to the lower index. Only the carved weights are cast back to float32.

The target is ``glm4_moe``: its sigmoid router with ``routed_scaling_factor=2`` and router logits
scaled to at most ``ROUTER_LOGIT_LIMIT`` weights every selected expert by 1 (to 0.05%), so
experts keep their natural scale and, with every expert selected and no refit, the carved model
computes the dense model exactly (up to float rounding).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, PreTrainedModel
from transformers.models.glm4_moe.modeling_glm4_moe import (
    Glm4MoeMoE,
    Glm4MoeRotaryEmbedding,
    Glm4MoeTopkRouter,
)

from flexmoe.data.texts import Batch
from flexmoe.errors import FlexMoEError

ROUTER_LOGIT_LIMIT = 1e-3  # largest |router logit| on calibration text: weights 2*sigmoid ~ 1
STRONG_FRACTION = 0.125  # a neuron is "strong" on a token when in its top 12.5% by strength
PARTITION_TOKENS = 8192  # calibration tokens whose co-activation patterns the clustering sees
KMEANS_ITERATIONS = 25
RIDGE = 1e-4  # ridge penalty relative to the mean feature energy
DENSE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")  # tested attention layouts
CARVE_DTYPE = torch.float64  # carving's arithmetic: see the module docstring


@dataclass(frozen=True)
class CarveConfig:
    """How to carve: routed experts per layer, experts per token, always-active neurons."""

    experts: int = 16
    top_k: int = 12
    shared_neurons: int = 512
    refit: bool = True
    seed: int = 0

    def expert_size(self, intermediate_size: int) -> int:
        """Neurons per routed expert; refuses settings that do not divide the FFN evenly."""
        if not 1 <= self.top_k <= self.experts:
            raise FlexMoEError(f"--top-k must be in 1..{self.experts}, got {self.top_k}")
        routed = intermediate_size - self.shared_neurons
        if self.shared_neurons < 0 or routed < self.experts:
            raise FlexMoEError(
                f"--shared-neurons {self.shared_neurons} leaves {routed} of the FFN's "
                f"{intermediate_size} neurons for {self.experts} experts; lower it"
            )
        size, rest = divmod(routed, self.experts)
        if rest or self.shared_neurons % size:
            raise FlexMoEError(
                f"{intermediate_size} FFN neurons minus {self.shared_neurons} shared do not split "
                f"into {self.experts} equal experts whose size also divides the shared neurons "
                f"(glm4_moe's shared expert is a whole number of experts); e.g. 1536 neurons "
                "carve as --experts 16 --shared-neurons 512"
            )
        return size


@dataclass
class LayerCarving:
    """What carving did to one layer, measured on the calibration tokens."""

    layer: int
    experts: list[list[int]]  # dense neuron indices of each routed expert
    shared: list[int]
    energy_lost: float  # share of the dense FFN output energy lost at top-k, before refit
    energy_lost_refit: float | None = None  # the same after the least-squares refit


@dataclass
class CarveReport:
    """A carving's settings, sizes and per-layer losses (saved beside the checkpoint)."""

    config: CarveConfig
    source: str
    expert_size: int
    active_fraction: float  # of FFN neurons, per token
    calibration_tokens: int
    layers: list[LayerCarving] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_carvable(model: PreTrainedModel) -> None:
    """Refuse a model that is already MoE, whose decoder MLPs are not gated, or whose layout
    glm4_moe does not compute alike."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    fused = [p for n, p in model.named_parameters() if n.endswith("gate_up_proj") and p.dim() == 3]
    counts = [getattr(model.config, n, None) for n in ("num_experts", "num_local_experts")]
    if fused or any(counts) or "moe" in model_type:
        raise FlexMoEError(
            f"model type {model_type!r} is already a mixture of experts; carve a dense model "
            "(Llama, Mistral, Qwen2, SmolLM and the like) or use this one as it is"
        )
    for index, layer in enumerate(_decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in projections) or not hasattr(mlp, "act_fn"):
            raise FlexMoEError(
                f"layer {index} of model type {model_type!r} has no gated MLP "
                "(gate_proj, up_proj, down_proj and act_fn); only gated (SwiGLU-style) FFNs "
                "can be carved into experts"
            )
        if any(p.bias is not None for p in projections):
            raise FlexMoEError(f"layer {index}'s MLP has biases; carving needs bias-free MLPs")
    if model_type not in DENSE_ARCHITECTURES:  # e.g. Gemma's (1 + w) norms, Granite's scales
        raise FlexMoEError(
            f"model type {model_type!r} cannot be carved: carving copies the attention and norm "
            f"weights into glm4_moe, which computes them as {', '.join(DENSE_ARCHITECTURES)} do "
            "(SmolLM is llama); other layouts would silently compute another function"
        )
    types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if len(types) > 1:
        raise FlexMoEError(
            f"model type {model_type!r} mixes attention layer types {sorted(types)}; carving "
            "supports models whose decoder layers all attend alike"
        )
    window = getattr(model.config, "sliding_window", None)
    if window and getattr(model.config, "use_sliding_window", True):
        raise FlexMoEError(
            f"model type {model_type!r} attends within a sliding window of {window} tokens, "
            "which glm4_moe cannot express; set config.sliding_window = None first if the "
            "model is only used on shorter inputs"
        )


def moe_config(dense: PreTrainedModel, config: CarveConfig) -> Glm4MoeConfig:
    """The ``glm4_moe`` configuration that holds a carving of ``dense``."""
    source = dense.config
    if getattr(source, "attention_bias", False) and source.model_type == "llama":
        raise FlexMoEError("Llama models with an output-projection bias cannot be carved")
    size = config.expert_size(source.intermediate_size)
    rope = dict(getattr(source, "rope_parameters", None) or {"rope_type": "default"})
    rope.setdefault("rope_theta", getattr(source, "rope_theta", 10000.0))
    rope["partial_rotary_factor"] = 1.0
    return Glm4MoeConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        moe_intermediate_size=size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None)
        or source.hidden_size // source.num_attention_heads,
        hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=rope,
        attention_bias=source.model_type == "qwen2" or bool(getattr(source, "attention_bias", 0)),
        tie_word_embeddings=bool(getattr(source, "tie_word_embeddings", False)),
        n_routed_experts=config.experts,
        n_shared_experts=config.shared_neurons // size,
        num_experts_per_tok=config.top_k,
        routed_scaling_factor=2.0,
        norm_topk_prob=False,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        use_qk_norm=hasattr(_decoder_layers(dense)[0].self_attn, "q_norm"),  # Qwen3
        num_nextn_predict_layers=0,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=getattr(source, "pad_token_id", None),
    )


@torch.no_grad()
def carve(
    dense: PreTrainedModel,
    batches: Sequence[Batch],
    config: CarveConfig = CarveConfig(),
    progress: bool = False,
) -> tuple[Glm4MoeForCausalLM, CarveReport]:
    """A ``glm4_moe`` model carved from ``dense`` on calibration ``batches``, and its report.

    ``dense`` must be float32, the carved model's dtype (a bfloat16 copy would have lost
    precision before carving starts; carving itself computes in float64). It is carved in
    place, its MLPs replaced layer by layer so that no second copy is held: load a fresh copy
    to keep using the dense model.
    """
    check_carvable(dense)
    if next(dense.parameters()).dtype != torch.float32:
        raise FlexMoEError("carve a float32 copy of the dense model (load it with dtype=float32)")
    if not batches:
        raise FlexMoEError("carving needs calibration text; give at least one batch")
    if dense.device.type == "mps":
        raise FlexMoEError("carving computes in float64, which MPS lacks; carve on CPU or CUDA")
    started = time.perf_counter()
    target = moe_config(dense, config)
    _check_weight_names(dense, target)
    working = dense.eval()
    working.set_attn_implementation("sdpa")  # eager attention's softmax runs in float32
    hidden, kwargs = _first_layer_inputs(working, batches)
    report = CarveReport(
        config=config,
        source=Path(getattr(dense.config, "name_or_path", "") or dense.config.model_type).name,
        expert_size=target.moe_intermediate_size,
        active_fraction=(config.shared_neurons + config.top_k * target.moe_intermediate_size)
        / dense.config.intermediate_size,
        calibration_tokens=sum(int(h.shape[0] * h.shape[1]) for h in hidden),
    )
    generator = torch.Generator().manual_seed(config.seed)
    exact_target = copy.deepcopy(target)  # the blocks carving computes with; only weights stay
    exact_target._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    for index, layer in enumerate(
        tqdm(_decoder_layers(working), desc="carving layers", disable=not progress)
    ):
        with _in_float64(layer):
            x = torch.cat([_mlp_input(layer, h, kw) for h, kw in zip(hidden, kwargs, strict=True)])
            block, carving = _carve_mlp(
                index, layer.mlp, x.flatten(0, -2), exact_target, config, generator
            )
        report.layers.append(carving)
        layer.mlp = block  # float64 until the layer's outputs are computed, then float32
        with _in_float64(layer):
            hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
    report.wall_s = round(time.perf_counter() - started, 1)
    return _as_moe_model(working, target, report), report


def _check_weight_names(dense: PreTrainedModel, target: Glm4MoeConfig) -> None:
    """Refuse, before any work, a dense model whose non-MLP weights glm4_moe does not hold."""
    with torch.device("meta"):
        names = set(Glm4MoeForCausalLM(target).state_dict())
    outside_mlp = lambda keys: {k for k in keys if ".mlp." not in k}  # noqa: E731
    missing = sorted(outside_mlp(names) - set(dense.state_dict()))
    unexpected = sorted(outside_mlp(dense.state_dict()) - names)
    if missing or unexpected:
        raise FlexMoEError(
            f"the attention and norm weights of {dense.config.model_type!r} do not map onto "
            f"glm4_moe (it lacks {unexpected[:3]}, needs {missing[:3]}); this attention layout "
            "cannot be carved"
        )


def _decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise FlexMoEError(
            f"cannot find the decoder layers (model.layers) of {type(model).__name__}; "
            f"carving supports decoder-only causal LMs such as {', '.join(DENSE_ARCHITECTURES)}"
        )
    return layers


class _Captured(Exception):
    """Raised by a hook once it has what it came for, to skip the rest of the forward."""


def _first_layer_inputs(model: PreTrainedModel, batches: Sequence[Batch]) -> tuple[list, list]:
    """Hidden states entering decoder layer 0 and the keyword arguments every layer receives,
    in float64 (the rotary embedding recomputed in it)."""
    hidden, kwargs = [], []

    def capture(_module, args, layer_kwargs):
        hidden.append(args[0] if args else layer_kwargs.pop("hidden_states"))
        kwargs.append({k: v for k, v in layer_kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = _decoder_layers(model)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Captured):
                model(**{k: v.to(model.device) for k, v in batch.items()}, use_cache=False)
    finally:
        handle.remove()
    for layer_kwargs in kwargs:  # a cache would grow with every layer call made while carving
        layer_kwargs["use_cache"] = False
        for name in ("cache", "past_key_values", "past_key_value"):
            layer_kwargs.pop(name, None)
        for name, value in layer_kwargs.items():
            if torch.is_tensor(value) and value.is_floating_point():  # an additive mask
                layer_kwargs[name] = value.to(CARVE_DTYPE)
        if "position_embeddings" in layer_kwargs:
            positions = layer_kwargs["position_ids"]
            layer_kwargs["position_embeddings"] = _float64_rotary(model.model.rotary_emb, positions)
    return [h.to(CARVE_DTYPE) for h in hidden], kwargs


def _float64_rotary(
    rotary: nn.Module, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding's cos and sin at ``positions``, in float64."""
    inverse = rotary.inv_freq.to(CARVE_DTYPE)  # other RoPE types are only computed in float32
    if rotary.rope_type == "default":
        theta = rotary.config.rope_parameters["rope_theta"]
        half = torch.arange(0, 2 * inverse.numel(), 2, dtype=CARVE_DTYPE, device=inverse.device)
        inverse = 1.0 / theta ** (half / (2 * inverse.numel()))
    angles = positions[..., None].to(CARVE_DTYPE) * inverse
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * rotary.attention_scaling, angles.sin() * rotary.attention_scaling


@contextlib.contextmanager
def _in_float64(layer: nn.Module) -> Iterator[None]:
    """Run float32 ``layer`` in float64, its RMSNorms and router too; then cast it back."""
    swapped = [
        (parent, name, child)
        for parent in list(layer.modules())
        for name, child in parent.named_children()
        if isinstance(child, Glm4MoeTopkRouter) or type(child).__name__.endswith("RMSNorm")
    ]
    try:
        for parent, name, child in swapped:
            routes = isinstance(child, Glm4MoeTopkRouter)
            setattr(parent, name, _Float64Router(child) if routes else _Float64RMSNorm(child))
        layer.to(CARVE_DTYPE)
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
        layer.to(torch.float32)


class _Float64RMSNorm(nn.Module):
    """An RMSNorm computed in its input's dtype (transformers' computes in float32)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.square().mean(-1, keepdim=True) + self.norm.variance_epsilon)
        return self.norm.weight * (x * scale)


class _Float64Router(nn.Module):
    """glm4_moe's router computed in its input's dtype (transformers' computes in float32)."""

    def __init__(self, router: Glm4MoeTopkRouter):
        super().__init__()
        self.router = router

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _route(self.router, x)


def _route(
    router: Glm4MoeTopkRouter, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, weights and chosen experts as ``router`` computes them, in ``x``'s precision.

    Carving's routers have one expert group and unnormalised weights (see ``moe_config``).
    """
    if router.num_group != 1 or router.norm_topk_prob:
        raise NotImplementedError("only routers with one group and unnormalised weights")
    logits = F.linear(x.view(-1, router.hidden_dim), router.weight.to(x.dtype))
    scores = logits.sigmoid()
    choice = scores + router.e_score_correction_bias.to(x.dtype)
    chosen = choice.topk(router.top_k, dim=-1).indices
    return logits, scores.gather(1, chosen) * router.routed_scaling_factor, chosen


def _mlp_input(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """What ``layer``'s MLP receives when the layer reads ``hidden``."""
    captured = []

    def capture(_module, args):
        captured.append(args[0])
        raise _Captured

    handle = layer.mlp.register_forward_pre_hook(capture)
    try:
        with contextlib.suppress(_Captured):
            layer(hidden, **kwargs)
    finally:
        handle.remove()
    return captured[0]


def _layer_output(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _carve_mlp(
    index: int,
    mlp: nn.Module,
    x: torch.Tensor,
    target: Glm4MoeConfig,
    config: CarveConfig,
    generator: torch.Generator,
) -> tuple[Glm4MoeMoE, LayerCarving]:
    """One dense MLP as a ``glm4_moe`` block, fitted on its inputs ``x [N, H]``."""
    down = mlp.down_proj.weight
    activations = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [N, I]
    dense_output = mlp.down_proj(activations)
    shared, experts = _partition(activations, down, config, generator)
    weight, bias = _fit_router(x, _expert_output_norms(activations, down, experts))
    block = _moe_block(target, mlp, shared, experts, weight, bias)
    active = _active_neurons(_route(block.gate, x)[2], shared, experts, activations.shape[1])
    kept = activations * active
    carving = LayerCarving(
        layer=index,
        experts=[e.tolist() for e in experts],
        shared=shared.tolist(),
        energy_lost=_energy_lost(dense_output, kept @ down.T),
    )
    if config.refit:
        refitted = _least_squares(kept, dense_output, prior=down.T).T  # [H, I]
        carving.energy_lost_refit = _energy_lost(dense_output, kept @ refitted.T)
        _set_experts(block, mlp.gate_proj.weight, mlp.up_proj.weight, refitted, shared, experts)
    return block, carving


def _partition(
    activations: torch.Tensor, down: torch.Tensor, config: CarveConfig, generator: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shared neurons (most often strong) and equal groups of the rest by co-activation."""
    strength = activations.abs() * down.norm(dim=0)
    count = max(1, round(STRONG_FRACTION * strength.shape[1]))
    strong = torch.zeros_like(strength, dtype=torch.bool)
    strong.scatter_(1, strength.topk(count, dim=1).indices, True)
    frequency = strong.sum(dim=0)  # integer counts tie often: the lower index goes first
    shared = frequency.argsort(descending=True, stable=True)[: config.shared_neurons].sort().values
    routed = torch.ones(strength.shape[1], dtype=torch.bool, device=strength.device)
    routed[shared] = False
    routed = routed.nonzero().squeeze(1)
    sample = torch.randperm(strength.shape[0], generator=generator)[:PARTITION_TOKENS]
    sample = sample.to(strength.device)
    patterns = strong[sample][:, routed].T.to(CARVE_DTYPE)  # [routed neurons, tokens]
    labels = balanced_kmeans(patterns, config.experts, generator)
    return shared, [routed[labels == c] for c in range(config.experts)]


def balanced_kmeans(
    points: torch.Tensor, clusters: int, generator: torch.Generator
) -> torch.Tensor:
    """Cluster labels ``[P]`` of ``points [P, D]`` into ``clusters`` groups of equal size.

    Lloyd's iterations whose assignment step fills clusters greedily, closest pairs first, up to
    ``P / clusters`` points each (the balanced k-means of MoEfication). Every cluster holds the
    same number ``n`` of points, so distances are ranked as ``n^2 |p - S/n|^2`` with ``S`` a
    cluster's sum: for integer points (0/1 patterns) an exact integer in float64, whatever order
    the machine sums in, and ties go to the lower index.
    """
    size, rest = divmod(points.shape[0], clusters)
    if rest or not size:
        raise FlexMoEError(f"{points.shape[0]} points do not split into {clusters} equal groups")
    points = points.to(CARVE_DTYPE)
    first = torch.randperm(points.shape[0], generator=generator)[:clusters]
    sums, members = points[first.to(points.device)], 1
    squares = points.square().sum(dim=1, keepdim=True)
    labels = torch.full((points.shape[0],), -1, device=points.device)
    for _ in range(KMEANS_ITERATIONS):
        scaled = members**2 * squares - 2 * members * points @ sums.T + sums.square().sum(dim=1)
        new = _assign_balanced(scaled.cpu(), size).to(points.device)
        if torch.equal(new, labels):
            break
        labels = new
        sums = points.new_zeros(clusters, points.shape[1]).index_add_(0, labels, points)
        members = size
    return labels


def _assign_balanced(distances: torch.Tensor, size: int) -> torch.Tensor:
    points, clusters = distances.shape
    labels = [-1] * points
    filled = [0] * clusters
    left = points
    for flat in distances.flatten().argsort(stable=True).tolist():
        point, cluster = divmod(flat, clusters)
        if labels[point] < 0 and filled[cluster] < size:
            labels[point] = cluster
            filled[cluster] += 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels)


def _expert_output_norms(
    activations: torch.Tensor, down: torch.Tensor, experts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``[N, E]``: how large each expert's output is on each token, as ``sqrt(a' D'D a)``."""
    norms = []
    for neurons in experts:
        part, columns = activations[:, neurons], down[:, neurons]
        norms.append(((part @ (columns.T @ columns)) * part).sum(dim=1).clamp_min(0).sqrt())
    return torch.stack(norms, dim=1)


def _fit_router(x: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router weight ``[E, H]`` and choice bias ``[E]`` ranking experts by predicted size.

    A ridge regression on each token's centred log output norms (only the ranking within a
    token matters), scaled so that the largest router logit on ``x`` is ``ROUTER_LOGIT_LIMIT``.
    The router has no intercept, but its choice bias is added to ``sigmoid(logit)`` ~
    ``0.5 + logit / 4``, so the intercept enters the choice bias divided by 4.
    """
    targets = norms.clamp_min(1e-8).log()
    targets = targets - targets.mean(dim=1, keepdim=True)
    features = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    coefficients = _least_squares(features, targets)  # [H + 1, E]
    weight, intercept = coefficients[:-1], coefficients[-1]
    scale = ROUTER_LOGIT_LIMIT / (x @ weight).abs().max().clamp_min(1e-12)
    return scale * weight.T, scale * intercept / 4


def _least_squares(
    features: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Ridge solution ``W`` of ``features @ W ~ targets``, shrunk towards ``prior`` (zero by
    default): a feature that is never active keeps its prior row."""
    if prior is not None:
        targets = targets - features @ prior
    gram = features.T @ features
    gram.diagonal().add_(RIDGE * gram.diagonal().mean().clamp_min(1e-12))
    solution = torch.linalg.solve(gram, features.T @ targets)
    return solution if prior is None else prior + solution


def _active_neurons(
    chosen: torch.Tensor, shared: torch.Tensor, experts: Sequence[torch.Tensor], size: int
) -> torch.Tensor:
    """``[N, I]`` bool: the neurons a token's chosen experts and the shared expert hold."""
    membership = torch.zeros(len(experts), size, device=chosen.device)
    for index, neurons in enumerate(experts):
        membership[index, neurons] = 1.0
    selected = membership.new_zeros(chosen.shape[0], len(experts)).scatter_(1, chosen, 1.0)
    active = (selected @ membership) > 0
    active[:, shared] = True
    return active


def _energy_lost(dense_output: torch.Tensor, output: torch.Tensor) -> float:
    """The share of the dense output's energy that ``output`` misses."""
    return round(float((dense_output - output).square().sum() / dense_output.square().sum()), 5)


def _moe_block(
    target: Glm4MoeConfig,
    mlp: nn.Module,
    shared: torch.Tensor,
    experts: Sequence[torch.Tensor],
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
) -> Glm4MoeMoE:
    weight = mlp.down_proj.weight
    block = Glm4MoeMoE(target).to(device=weight.device, dtype=weight.dtype)
    block.gate.weight.copy_(router_weight)
    block.gate.e_score_correction_bias.copy_(router_bias)
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    _set_experts(block, gate, up, down, shared, experts)
    return block.eval()


def _set_experts(
    block: Glm4MoeMoE,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    shared: torch.Tensor,
    experts: Sequence[torch.Tensor],
) -> None:
    """Copy the dense neurons of each expert, and of the shared expert, into ``block``."""
    for index, neurons in enumerate(experts):
        block.experts.gate_up_proj[index].copy_(torch.cat([gate[neurons], up[neurons]]))
        block.experts.down_proj[index].copy_(down[:, neurons])
    block.shared_experts.gate_proj.weight.copy_(gate[shared])
    block.shared_experts.up_proj.weight.copy_(up[shared])
    block.shared_experts.down_proj.weight.copy_(down[:, shared])


def _as_moe_model(
    working: PreTrainedModel, target: Glm4MoeConfig, report: CarveReport
) -> Glm4MoeForCausalLM:
    """The carved layers and the dense model's other weights as one ``glm4_moe`` model."""
    target.flexmoe_carving = {k: v for k, v in report.to_dict().items() if k not in ("layers",)}
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(target)
    model.load_state_dict(working.state_dict(), strict=True, assign=True)
    model.tie_weights()
    with torch.device(working.device):
        model.model.rotary_emb = Glm4MoeRotaryEmbedding(target)  # its buffers are not saved
    model.generation_config = copy.deepcopy(working.generation_config)
    return model.eval()
