"""Held-out perplexity: packaged texts, and windowed batched NLL against plain forwards."""

import math
from pathlib import Path

import pytest
import torch

import flexmoe
from flexmoe.data import heldout_texts
from flexmoe.errors import FlexMoEError
from flexmoe.evaluation.perplexity import domain_perplexities, perplexity
from tests.tiny_models import TEXTS, build_model

TEXT = " ".join(TEXTS)


def window_nll(model, ids: list[int]) -> tuple[float, int]:
    """Summed NLL of one window from a plain, unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])
    return -logprobs.sum().item(), len(ids) - 1


def test_heldout_texts_are_the_packaged_files():
    folder = Path(flexmoe.__file__).parent / "assets" / "heldout"
    texts = heldout_texts()
    assert list(texts) == sorted(p.stem for p in folder.glob("*.txt"))
    assert len(texts) >= 2
    for domain, text in texts.items():
        assert text == (folder / f"{domain}.txt").read_text(encoding="utf-8")
        assert len(text) > 1000


def test_one_window_is_the_models_own_loss(tokenizer):
    model = build_model("qwen2_moe")
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert 20 < len(ids) <= 128
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert perplexity(model, tokenizer, TEXT, seq_len=128) == pytest.approx(
        math.exp(loss.item()), rel=1e-5
    )


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_windows_are_token_weighted(tokenizer, model_type, batch_size):
    model = build_model(model_type)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:50]
    windows = [ids[i : i + 16] for i in range(0, 50, 16)]
    assert [len(w) for w in windows] == [16, 16, 16, 2]
    nll, count = map(sum, zip(*(window_nll(model, w) for w in windows), strict=True))
    assert count == 46
    measured = perplexity(model, tokenizer, TEXT, seq_len=16, max_tokens=50, batch_size=batch_size)
    assert measured == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert measured != pytest.approx(perplexity(model, tokenizer, TEXT, seq_len=16, max_tokens=49))


def test_refuses_texts_and_windows_too_short(tokenizer):
    model = build_model("olmoe")
    with pytest.raises(FlexMoEError, match="at least 2 tokens"):
        perplexity(model, tokenizer, "a")
    with pytest.raises(FlexMoEError, match="window length must be at least 2"):
        perplexity(model, tokenizer, TEXT, seq_len=1)


def test_domain_perplexities_cover_every_domain(tokenizer):
    model = build_model("qwen3_moe")
    result = domain_perplexities(model, tokenizer, max_tokens=48, seq_len=24)
    assert list(result) == list(heldout_texts())
    assert all(1.0 < value < 10 * 320 and math.isfinite(value) for value in result.values())
    assert len(set(result.values())) == len(result)
