"""What a federation costs before a weight is loaded: ``flexmoe plan``.

The model is built on the meta device from its config alone (shapes, no values), and each method's
adapters are put on it by the same code that trains them (``FlexModel``), so parameters are counted
by role exactly. From those counts:

- traffic: a reply carries every shared parameter as float32 (numpy has no bfloat16), and so does
  the request; per client and round, each way;
- the personal adapter: its float32 safetensors (plus the shared part, for ``local``);
- training memory of one client: weights as held (frozen base in its dtype, adapters in float32),
  gradients and AdamW's two moments for what trains, and an estimate of the activations saved
  for the backward pass (``activation_bytes``; measured against autograd in the tests);
- MoE FLOPs per token of the base and of K+1 experts, and grafting's compute as a multiple of
  one forward over its selection examples (``flexmoe.evaluation.cost``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from flexmoe.evaluation.cost import flops_per_token, grafting_flops, grafting_forwards
from flexmoe.flex import FlexConfig, FlexModel, GraftSettings
from flexmoe.flex.graft import ADAPTER_DTYPE, LayerGraft
from flexmoe.flex.moe import MoEBlockView, find_moe_blocks
from flexmoe.flex.roles import Role
from flexmoe.methods import Method
from flexmoe.models.loading import load_config, meta_model

WIRE_BYTES = 4  # per shared parameter, each way (float32 arrays)
ANSWER_SHARE = 0.25  # positions whose logits training computes (answers only; see answer_loss)
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class Memory:
    """Bytes one training client holds, by kind."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int  # with gradient checkpointing

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class MethodPlan:
    """One method on one model: parameters by role, traffic, adapter size and memory."""

    method: str
    frozen: int
    shared: int
    personal: int
    bytes_up: int  # per client and round
    bytes_down: int
    adapter_bytes: int
    memory: Memory


@dataclass(frozen=True)
class Plan:
    """A model's shape, its MoE FLOPs, and every method planned on it."""

    model: str
    model_type: str
    dtype: str
    parameters: int
    moe_layers: int
    experts: int
    top_k: int
    experts_per_layer: int
    flops_base: int  # MoE FLOPs per token
    flops_personalised: int
    examples_per_forward: int  # a training step's, whose activations are held at once
    seq_len: int
    methods: list[MethodPlan]
    grafting: dict  # FLOPs per token: a forward's and scoring's (see grafting_flops)
    selection_tokens: int | None  # selection examples x seq_len (at most); None: every example
    scored_tokens: int | None  # per layer; None: every selection token

    @property
    def flops_ratio(self) -> float:
        return self.flops_personalised / self.flops_base

    @property
    def grafting_forwards(self) -> float | None:
        """Grafting's compute in forwards over the selection data (None: it grows with it)."""
        if self.selection_tokens is None:
            return None if self.scored_tokens else grafting_forwards(self.grafting, 1, 1)
        scored = min(self.scored_tokens or self.selection_tokens, self.selection_tokens)
        return grafting_forwards(self.grafting, self.selection_tokens, scored)

    def uplink_ratio(self, method: str, baseline: str = "fedavg-full") -> float:
        by_name = {m.method: m for m in self.methods}
        return by_name[method].bytes_up / by_name[baseline].bytes_up


def plan(
    source: str,
    methods: list[Method],
    dtype: torch.dtype = torch.bfloat16,
    examples_per_forward: int = 8,
    seq_len: int = 512,
    graft: GraftSettings | None = None,
) -> Plan:
    """Plan every method of ``methods`` on the model ``source`` names (see ``load_config``),
    grafting as ``graft`` says (default: the default settings)."""
    graft = graft or GraftSettings()
    model = meta_model(load_config(source), dtype)
    views = find_moe_blocks(model)
    experts_per_layer = graft.experts_per_layer
    grafts = first_expert_grafts(views, experts_per_layer, graft.size_ratio)
    planned = [
        plan_method(model, method, grafts, examples_per_forward, seq_len, experts_per_layer)
        for method in methods
    ]
    flex = FlexModel(model, grafts)
    flops = flops_per_token(flex.model)
    flex.unload()
    return Plan(
        model=source,
        model_type=model.config.model_type,
        dtype=str(dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
        moe_layers=len(views),
        experts=views[0].num_experts,
        top_k=views[0].rule.top_k,
        experts_per_layer=experts_per_layer,
        flops_base=flops["base"],
        flops_personalised=flops["personalised"],
        examples_per_forward=examples_per_forward,
        seq_len=seq_len,
        methods=planned,
        grafting=grafting_flops(model),
        selection_tokens=graft.selection_examples * seq_len or None,
        scored_tokens=graft.selection_token_budget or None,
    )


def first_expert_grafts(
    views: list[MoEBlockView], experts_per_layer: int, size_ratio: float
) -> list[LayerGraft]:
    """Grafts of the first experts of every layer: the sizes are what counts, not the choice."""
    grafts = []
    for view in views:
        keep = max(1, round(size_ratio * view.intermediate_size))
        experts = tuple(range(min(experts_per_layer, view.num_experts)))
        grafts.append(LayerGraft(view.layer, experts, tuple(tuple(range(keep)) for _ in experts)))
    return grafts


def plan_method(
    model: nn.Module,
    method: Method,
    grafts: list[LayerGraft],
    examples_per_forward: int,
    seq_len: int,
    experts_per_layer: int,
) -> MethodPlan:
    """``method``'s adapters put on the meta ``model``, counted, and taken off again."""
    flex = FlexModel(model, grafts if method.grafts else (), FlexConfig(shared=method.shared))
    roles = flex.roles()
    parameters = dict(flex.model.named_parameters())
    counts = {role: 0 for role in Role}
    for name, role in roles.items():
        counts[role] += parameters[name].numel()
    trained = [p for p in parameters.values() if p.requires_grad]

    def held(p: torch.Tensor) -> int:  # a base whose weights train is held in float32
        return p.numel() * (4 if method.shared.trains_base_weights else p.element_size())

    trained_bytes = sum(held(p) for p in trained)
    shared = counts[Role.SHARED] if method.federated else 0
    on_disk = counts[Role.PERSONAL] + (0 if method.federated else counts[Role.SHARED])
    tokens = examples_per_forward * seq_len
    memory = Memory(
        weights=sum(held(p) for p in parameters.values()),
        gradients=trained_bytes,
        optimizer=ADAM_MOMENTS * trained_bytes,
        activations=activation_bytes(flex, tokens, experts_per_layer if method.grafts else 0),
        activations_checkpointed=activation_bytes(
            flex, tokens, experts_per_layer if method.grafts else 0, checkpointed=True
        ),
    )
    flex.unload()
    return MethodPlan(
        method=method.name,
        frozen=counts[Role.FROZEN],
        shared=shared,
        personal=counts[Role.PERSONAL],
        bytes_up=WIRE_BYTES * shared,
        bytes_down=WIRE_BYTES * shared,
        adapter_bytes=ADAPTER_DTYPE.itemsize * on_disk,
        memory=memory,
    )


def activation_bytes(flex: FlexModel, tokens: int, grafted: int, checkpointed: bool = False) -> int:
    """An estimate of the bytes autograd saves for one training step over ``tokens`` tokens.

    Frozen linear layers save nothing (their inputs are needed only for weight gradients);
    what is saved per token and layer is: two RMSNorms (a float32 copy and the normalised
    input), attention's q, k, v and output, each LoRA target's float32 input, dropout mask and
    rank-r product, the router's float32 scores, the gate, up and activation of every routed
    (top-k) and shared expert neuron plus each routed expert's output, and every grafted
    expert's float32 input, neurons and gated output. Logits are made at ``ANSWER_SHARE`` of
    the positions, in float32. When training changes the base's weights, their inputs are
    saved too. ``checkpointed`` keeps each layer's input only, plus one layer recomputed.
    """
    model = flex.model
    config = model.config.get_text_config()
    dtype_bytes = next(model.parameters()).element_size()
    f32 = 4
    hidden = config.hidden_size
    q_width, k_width, v_width = _attention_widths(config)
    views = {v.layer: v for v in find_moe_blocks(model)}
    layers = config.num_hidden_layers
    lora = [m for m in model.modules() if hasattr(m, "lora_A") and m.lora_A]
    per_token = 0.0
    for m in lora:
        a = next(iter(m.lora_A.values()))
        per_token += a.in_features * (f32 + 1) + a.out_features * f32
    norm_widths = 2 * hidden + _attention_norm_widths(model, config, q_width, k_width)
    norms = layers * norm_widths * (f32 + dtype_bytes)
    attention = layers * (2 * q_width + k_width + v_width) * dtype_bytes
    moe = 0.0
    for view in views.values():
        k, size = view.rule.top_k, view.intermediate_size
        moe += view.num_experts * f32 + k * (3 * size + hidden) * dtype_bytes
        if view.shared_expert is not None:
            moe += 3 * _intermediate(view.shared_expert) * dtype_bytes
        moe += grafted * (2 * hidden + 4 * size + 2) * f32
    dense_layers = layers - len(views)
    dense = dense_layers * 3 * (getattr(config, "intermediate_size", 0) or 0) * dtype_bytes
    base_inputs = 0.0
    if flex.config.shared.trains_base_weights:
        for view in views.values():
            routed = view.rule.top_k * (hidden + view.intermediate_size)
            base_inputs += (routed + hidden) * dtype_bytes
        base_inputs += layers * (hidden + q_width) * dtype_bytes
    per_token += norms + attention + moe + dense + base_inputs
    logits = ANSWER_SHARE * config.vocab_size * f32
    if checkpointed:
        per_token = layers * hidden * dtype_bytes + per_token / layers
    return int(tokens * (per_token + logits))


def _attention_widths(config: PretrainedConfig) -> tuple[int, int, int]:
    """Widths of q, k and v per token as attention sees them (MLA: DeepSeek's head sizes)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "qk_nope_head_dim", None):  # multi-head latent attention
        qk = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
        return qk, qk, heads * config.v_head_dim
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return heads * head_dim, kv, kv


def _attention_norm_widths(
    model: nn.Module, config: PretrainedConfig, q_width: int, k_width: int
) -> int:
    """Widths normalised inside attention: QK-norm (OLMoE, Qwen3) and MLA's latent norms."""
    attention = next((m for n, m in model.named_modules() if n.endswith("self_attn")), None)
    widths = {
        "q_norm": q_width,
        "k_norm": k_width,
        "q_a_layernorm": getattr(config, "q_lora_rank", 0) or 0,
        "kv_a_layernorm": getattr(config, "kv_lora_rank", 0) or 0,
    }
    return sum(width for name, width in widths.items() if hasattr(attention, name))


def _intermediate(mlp: nn.Module) -> int:
    down = getattr(mlp, "down_proj", None)
    return down.in_features if isinstance(down, nn.Linear) else 0


def saved_activation_bytes(model: nn.Module, loss: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves while ``loss()`` runs its forward: what the estimate above
    estimates, measured (tensors sharing storage are counted once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def format_plan(result: Plan) -> str:
    """``flexmoe plan``'s report: the model, then a row per method."""
    flex_experts = result.top_k + result.experts_per_layer
    lines = [
        f"{result.model} ({result.model_type}): {_count(result.parameters)} parameters in "
        f"{result.dtype}; {result.moe_layers} MoE layers of {result.experts} experts, "
        f"top-{result.top_k}",
        f"grafting {result.experts_per_layer} expert(s) per layer: {flex_experts} experts per "
        f"token, MoE FLOPs per token {result.flops_ratio:.3f}x the base's",
        _grafting_line(result),
        f"traffic per client and round, each way; memory of one training client at "
        f"{result.examples_per_forward} x {result.seq_len} tokens a forward pass (activations "
        "estimated; after the /: with gradient checkpointing)",
        "",
        " ".join(f"{title:>{width}}" for title, width in PLAN_COLUMNS),
    ]
    names = {m.method for m in result.methods}
    for m in result.methods:
        memory = m.memory
        ratio = result.uplink_ratio(m.method) if "fedavg-full" in names else float("nan")
        values = [
            m.method, _count(m.shared), _count(m.personal), _size(m.bytes_up),
            f"{ratio:.2e}", _size(m.adapter_bytes), _size(memory.weights),
            _size(memory.gradients + memory.optimizer),
            f"{_size(memory.activations)} / {_size(memory.activations_checkpointed)}",
            _size(memory.total),
        ]  # fmt: skip
        lines.append(" ".join(f"{v:>{w}}" for v, (_, w) in zip(values, PLAN_COLUMNS, strict=True)))
    return "\n".join(lines)


def _grafting_line(result: Plan) -> str:
    selection = (
        f"{result.selection_tokens // result.seq_len} examples x {result.seq_len} tokens"
        if result.selection_tokens
        else "every training example"
    )
    scored = f"{result.scored_tokens} tokens" if result.scored_tokens else "every token"
    forwards = result.grafting_forwards
    if forwards is None:  # a fixed scoring cost on top of a forward over data of unknown size
        scoring = result.scored_tokens * result.grafting["scoring"] / result.grafting["forward"]
        cost = (
            f"a forward over them plus as much compute as a forward over {_count(scoring)} tokens"
        )
    else:
        cost = f"{forwards:.2f} forwards' compute"
    return f"grafting on {selection}, scoring {scored} per layer: {cost}"


PLAN_COLUMNS = (
    ("method", 12), ("shared", 8), ("personal", 8), ("traffic", 9), ("vs full", 8), ("adapter", 9),
    ("weights", 9), ("grad+Adam", 9), ("activations", 19), ("total", 9),
)  # fmt: skip


def plans_table(plans: list[Plan]) -> str:
    """The README's table: FLEx against fedavg-full on each model, from ``plan``."""
    rows = [
        "| model | parameters | FLEx uplink / round | fedavg-full uplink / round | ratio "
        "| personal adapter | FLEx client memory (checkpointed) | MoE FLOPs, K+1 "
        "| grafting, in forwards (every token) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in plans:
        by_name = {m.method: m for m in result.methods}
        flex, full = by_name["flex"], by_name["fedavg-full"]
        checkpointed = flex.memory.total - flex.memory.activations
        checkpointed += flex.memory.activations_checkpointed
        rows.append(
            f"| {result.model} | {_count(result.parameters)} | {_size(flex.bytes_up)} | "
            f"{_size(full.bytes_up)} | {result.uplink_ratio('flex'):.1e} | "
            f"{_size(flex.adapter_bytes)} | {_size(flex.memory.total)} ({_size(checkpointed)}) "
            f"| {result.flops_ratio:.3f}x | {result.grafting_forwards or float('nan'):.2f} "
            f"({grafting_forwards(result.grafting, 1, 1):.2f}) |"
        )
    return "\n".join(rows)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
