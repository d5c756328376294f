"""A personalised model as a plain transformers checkpoint (``flexmoe export --merge``).

A grafted block computes ``block(x) + sigmoid(w . x) * G(x)``. With one grafted expert per layer
and a gate without a bias, that is Qwen2-MoE's sparse block exactly: ``G`` is its shared expert
and ``w`` its ``shared_expert_gate``. A base whose attention, routing and experts Qwen2-MoE
computes the same way, and which has no shared expert of its own (Mixtral), is written as a
``qwen2_moe`` checkpoint with the shared LoRA merged into the attention weights. Anything else
is refused with the reason; nothing approximate is written.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from flexmoe.errors import FlexMoEError
from flexmoe.flex.graft import GraftedMoEBlock
from flexmoe.flex.moe import RoutingRule, find_moe_blocks
from flexmoe.flex.roles import LORA_ADAPTER

# what a Mixtral config says, by Qwen2-MoE's names
MIXTRAL_AS_QWEN2_MOE = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "hidden_act": "hidden_act",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "rope_parameters": "rope_parameters",
    "attention_dropout": "attention_dropout",
    "num_experts_per_tok": "num_experts_per_tok",
    "num_experts": "num_local_experts",
    "moe_intermediate_size": "intermediate_size",
    "intermediate_size": "intermediate_size",
    "pad_token_id": "pad_token_id",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}


def merge_problem(flex) -> str | None:
    """Why ``flex`` (a ``FlexModel``) cannot be written as a Qwen2-MoE checkpoint exactly."""
    config = flex.model.config
    if config.model_type != "mixtral":
        reason = (
            "has a gated shared expert of its own, and Qwen2-MoE has room for one"
            if config.model_type == "qwen2_moe"
            else "computes attention, routing or experts in a way Qwen2-MoE does not"
        )
        return f"model type {config.model_type!r} {reason} (merging is offered for mixtral)"
    if getattr(config, "sliding_window", None):
        return "its attention slides over a window, which Qwen2-MoE's does not here"
    rules = {v.rule for v in find_moe_blocks(flex.model)}
    modelled = all(isinstance(r, RoutingRule) and r.scoring == "softmax" for r in rules)
    if not modelled or any(r.n_group > 1 or r.scale != 1 or r.bias is not None for r in rules):
        return "its routing is not Qwen2-MoE's softmax top-k"
    blocks = [m for m in flex.model.modules() if isinstance(m, GraftedMoEBlock)]
    if any(len(b.grafted_experts) > 1 for b in blocks):
        return "it grafts more than one expert per layer, and Qwen2-MoE has one shared expert"
    if any(gate.bias is not None for b in blocks for gate in b.grafted_gates):
        return (
            "its gates have a bias and Qwen2-MoE's shared_expert_gate has none; graft with "
            "gate-with-bias off (flexmoe run --gate-with-bias false) to merge"
        )
    if len({g.intermediate_sizes[0] for g in flex.grafts}) > 1:
        return (
            "its grafted experts differ in size across layers, and Qwen2-MoE's shared ones do not"
        )
    return None


@torch.no_grad()
def merged_model(flex) -> PreTrainedModel:
    """``flex`` (a ``FlexModel``) as a ``qwen2_moe`` model that computes the same logits."""
    problem = merge_problem(flex)
    if problem is not None:
        raise FlexMoEError(f"cannot merge exactly: {problem}")
    base_config = flex.model.config
    shared_size = flex.grafts[0].intermediate_sizes[0] if flex.grafts else 1
    values = {
        ours: getattr(base_config, theirs, None) for ours, theirs in MIXTRAL_AS_QWEN2_MOE.items()
    }
    config = AutoConfig.for_model(
        "qwen2_moe",
        **{k: v for k, v in values.items() if v is not None},
        shared_expert_intermediate_size=shared_size,
        norm_topk_prob=True,
        qkv_bias=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
    )
    dtype = next(p.dtype for n, p in flex.model.named_parameters() if "lora_" not in n)
    with torch.device("meta"):
        merged = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = merged_state(flex.model, shared_size, dtype)
    merged.load_state_dict(state, strict=True, assign=True)
    device = next(iter(state.values())).device
    # the rotary frequencies are a buffer made from the config, not a weight: made here
    merged.model.rotary_emb = type(merged.model.rotary_emb)(config=config).to(device)
    if config.tie_word_embeddings:
        merged.tie_weights()
    return merged.eval()


def merged_state(model: nn.Module, shared_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The grafted model's weights under Qwen2-MoE's names: LoRA merged into its layers, each
    block's grafted expert and gate as its shared expert and gate (zeros where none is)."""
    state = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            state[f"{path}.weight"] = base.weight + module.get_delta_weight(LORA_ADAPTER)
            if base.bias is not None:
                state[f"{path}.bias"] = base.bias
    for name, tensor in model.state_dict().items():
        if ".lora_" in name or ".base_layer." in name or ".grafted_" in name:
            continue
        state[name.replace(".block.", ".")] = tensor
    hidden = model.config.hidden_size
    for view in find_moe_blocks(model):
        path = view.path.removesuffix(".block")
        grafted = model.get_submodule(path)
        if isinstance(grafted, GraftedMoEBlock):
            expert, gate = grafted.grafted_experts[0], grafted.grafted_gates[0].weight
            parts = {p: getattr(expert, p).weight for p in ("gate_proj", "up_proj", "down_proj")}
        else:
            parts = {
                "gate_proj": torch.zeros(shared_size, hidden),
                "up_proj": torch.zeros(shared_size, hidden),
                "down_proj": torch.zeros(hidden, shared_size),
            }
            gate = torch.zeros(1, hidden)
        for part, weight in parts.items():
            state[f"{path}.shared_expert.{part}.weight"] = weight
        state[f"{path}.shared_expert_gate.weight"] = gate
    return {name: tensor.detach().to(dtype) for name, tensor in state.items()}
