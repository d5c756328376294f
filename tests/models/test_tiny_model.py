"""The bundled pretrained tiny MoE: architecture, size, held-out quality, expert specialisation."""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from corpus import DOMAINS, chunk_text, split_documents
from transformers import AutoModelForCausalLM, AutoTokenizer

TINY = Path(str(files("flexmoe") / "assets" / "tiny"))
HELDOUT = Path(str(files("flexmoe") / "assets" / "heldout"))
SEQ_LEN = 256
MAX_TOKENS = 2048


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled tokenizer."""
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def model():
    """The bundled pretrained model."""
    return AutoModelForCausalLM.from_pretrained(TINY).eval()


@pytest.fixture(scope="module")
def untrained(model):
    """A freshly initialised model of the same configuration."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model.config).eval()


@pytest.fixture(scope="module")
def heldout_ids(tokenizer) -> dict[str, torch.Tensor]:
    """Held-out token rows per domain, from the shipped held-out samples."""
    out = {}
    for domain in DOMAINS:
        text = (HELDOUT / f"{domain}.txt").read_text("utf-8")
        ids = torch.tensor(tokenizer(text)["input_ids"][:MAX_TOKENS])
        out[domain] = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    return out


@torch.no_grad()
def perplexity(model, rows: torch.Tensor) -> float:
    """Token-level perplexity of a causal LM on rows of token ids."""
    return math.exp(float(model(input_ids=rows, labels=rows).loss))


@torch.no_grad()
def expert_usage(model, rows: torch.Tensor) -> torch.Tensor:
    """Fraction of top-k routing assignments per expert, shape [layers, experts]."""
    out = model(input_ids=rows, output_router_logits=True)
    k, n = model.config.num_experts_per_tok, model.config.num_experts
    counts = torch.stack(
        [torch.bincount(r.topk(k, -1).indices.flatten(), minlength=n) for r in out.router_logits]
    ).float()
    return counts / counts.sum(-1, keepdim=True)


def mean_tv(usage: dict[str, torch.Tensor]) -> float:
    """Mean over domains and layers of the total-variation distance to the average usage."""
    stacked = torch.stack(list(usage.values()))
    return float(0.5 * (stacked - stacked.mean(0)).abs().sum(-1).mean())


def test_architecture(model) -> None:
    """At most 10M parameters, >= 8 routed experts, top-2 routing and a shared expert."""
    cfg = model.config
    assert cfg.model_type == "qwen2_moe"
    assert sum(p.numel() for p in model.parameters()) <= 10_000_000
    assert cfg.num_experts >= 8
    assert cfg.num_experts_per_tok == 2
    assert cfg.shared_expert_intermediate_size > 0
    assert cfg.output_router_logits is False
    mlp = model.model.layers[0].mlp
    assert mlp.gate.weight.shape[0] == cfg.num_experts
    assert hasattr(mlp, "shared_expert")


def test_folder_size() -> None:
    """The shipped model folder stays under 25 MB."""
    size = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024


def test_tokenizer_round_trip(tokenizer) -> None:
    """The tokenizer round-trips text and uses <|endoftext|> as eos and pad."""
    text = "def add(a, b):\n    return a + b  # To be, or not to be."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert 4096 <= len(tokenizer) <= 16384


def test_heldout_samples_present() -> None:
    """Every domain ships a held-out sample of a few KB to about 20 KB."""
    for domain in DOMAINS:
        size = (HELDOUT / f"{domain}.txt").stat().st_size
        assert 4_000 <= size <= 24_000, (domain, size)


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_perplexity_beats_untrained(model, untrained, heldout_ids, domain) -> None:
    """Held-out perplexity is far below that of the same architecture untrained."""
    trained_ppl = perplexity(model, heldout_ids[domain])
    untrained_ppl = perplexity(untrained, heldout_ids[domain])
    assert untrained_ppl > 0.5 * model.config.vocab_size
    assert trained_ppl < 0.05 * untrained_ppl, (trained_ppl, untrained_ppl)


def test_expert_usage_specialises_by_domain(model, heldout_ids) -> None:
    """Routing is concentrated, differs measurably between domains, and uses most experts."""
    usage = {d: expert_usage(model, rows) for d, rows in heldout_ids.items()}
    n = model.config.num_experts
    entropy = {d: float(-(u * u.clamp_min(1e-12).log()).sum(-1).mean()) for d, u in usage.items()}
    assert max(entropy.values()) < 0.9 * math.log(n), entropy
    assert mean_tv(usage) > 0.08
    code_vs_verse = 0.5 * (usage["python_code"] - usage["bible"]).abs().sum(-1)
    assert float(code_vs_verse.max()) > 0.25, code_vs_verse
    overall = torch.stack(list(usage.values())).mean(0)
    assert ((overall > 0.01).sum(-1) >= 6).all(), overall


def test_report_matches_shipped_model(model) -> None:
    """The pretraining report describes the shipped configuration."""
    report = json.loads((TINY / "pretrain_report.json").read_text("utf-8"))
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["config"]["num_experts"] == model.config.num_experts
    assert set(report["heldout_ppl"]["trained"]) == set(DOMAINS)


def test_split_is_deterministic_and_disjoint() -> None:
    """The corpus split depends only on the seed and never overlaps."""
    docs = [f"document {i}" for i in range(2000)]
    first, again = split_documents("x", docs, seed=0), split_documents("x", docs, seed=0)
    other = split_documents("x", docs, seed=1)
    assert first == again
    assert first.heldout != other.heldout
    assert not set(first.train) & set(first.heldout)
    assert 0.02 < len(first.heldout) / len(docs) < 0.08


def test_chunk_text_respects_size() -> None:
    """Chunks stay near the requested size and keep all the text."""
    text = "\n\n".join(f"paragraph {i} " * 20 for i in range(200))
    chunks = chunk_text(text, 1000)
    assert max(map(len, chunks)) <= 2000
    assert sum(c.count("paragraph") for c in chunks) == 200 * 20
