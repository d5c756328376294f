"""Tiny random transformers MoE models of every tested architecture, and a tokenizer for them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

VOCAB = 320
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)
ARCHITECTURES = {
    "qwen2_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=6,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=6,
        num_experts_per_tok=2,
        head_dim=8,
        norm_topk_prob=True,
    ),
    "olmoe": dict(intermediate_size=16, num_experts=6, num_experts_per_tok=2),
    "mixtral": dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
    "deepseek_v3": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        num_key_value_heads=4,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        routed_scaling_factor=2.5,
    ),
}
# MoE architectures beyond the tested list, built with the sizes of MOE_SIZES their configs have:
# graft must work on them by the modelled routing rules or by running the router as written
# (phimoe's sparsemixer); minimax_m2's router takes its bias from the block as an argument
OTHER_ARCHITECTURES = (
    "cohere2_moe", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe", "granitemoe", "jamba",
    "minimax", "minimax_m2", "phimoe", "qwen3_5_moe_text", "qwen3_next", "solar_open",
)  # fmt: skip
# hybrid models: one linear-attention (or Mamba) and one attention layer of their two, as a
# cache of linear-attention layers alone cannot build an attention mask
LINEAR_THEN_FULL = dict(
    layer_types=["linear_attention", "full_attention"],
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)
HYBRID_LAYERS = {
    "qwen3_5_moe_text": LINEAR_THEN_FULL,
    "qwen3_next": LINEAR_THEN_FULL,
    "jamba": dict(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0
    ),
}
MOE_SIZES = dict(
    intermediate_size=64,
    moe_intermediate_size=16,
    num_experts=6,
    num_local_experts=6,
    n_routed_experts=6,
    num_experts_per_tok=2,
    head_dim=8,
    first_k_dense_replace=0,
    n_group=1,
    topk_group=1,
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "def add(a, b):\n    return a + b",
    "Below is an instruction that describes a task. Write a response.",
    "### Instruction:\nName a colour.\n\n### Response:\nRed",
]


def make_tokenizer(corpus: Iterable[str], vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer trained on ``corpus`` (no downloads)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


def build_model(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A tiny randomly initialised causal LM of ``model_type``, in evaluation mode."""
    if model_type in ARCHITECTURES:
        sizes = {**COMMON, **ARCHITECTURES[model_type]}
    else:
        defaults = AutoConfig.for_model(model_type)
        wanted = {**COMMON, **MOE_SIZES, **HYBRID_LAYERS.get(model_type, {})}
        sizes = {k: v for k, v in wanted.items() if hasattr(defaults, k)}
    config = AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def random_batches(count: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of random tokens, the second row of each padded at the end."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        ids = torch.randint(2, VOCAB, (2, 12), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def save_model(folder: Path, model_type: str, seed: int = 0) -> Path:
    """Save a tiny model of ``model_type`` with a tokenizer beside it, as a real model folder."""
    build_model(model_type, seed).save_pretrained(folder)
    make_tokenizer(TEXTS * 10).save_pretrained(folder)
    return folder
