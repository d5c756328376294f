"""Local training's loss: the answer-only projection equals the model's own loss."""

import pytest
import torch

from flexmoe.data import IGNORE_INDEX
from flexmoe.errors import FlexMoEError
from flexmoe.training import answer_loss, mean_loss, train_steps
from tests.tiny_models import ARCHITECTURES, build_model, random_batches


def labelled(batch: dict[str, torch.Tensor], answer_from: tuple[int, int]) -> dict:
    """``batch`` labelled on each row's real tokens from ``answer_from[row]`` on."""
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for row, start in enumerate(answer_from):
        keep = batch["attention_mask"][row].bool()
        keep[:start] = False
        labels[row, keep] = batch["input_ids"][row, keep]
    return {**batch, "labels": labels}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_answer_loss_equals_the_models_own_loss(model_type):
    model = build_model(model_type)
    for batch in random_batches(3):
        batch = labelled(batch, (9, 5))  # answers at different positions in the two rows
        with torch.no_grad():
            expected = model(**batch).loss
            assert torch.allclose(answer_loss(model, batch), expected, atol=1e-6)


def test_answer_loss_gradients_equal_the_full_loss():
    model = build_model("qwen2_moe").train()
    batch = labelled(random_batches(1)[0], (10, 3))
    grads = []
    for loss_of in (lambda: model(**batch).loss, lambda: answer_loss(model, batch)):
        model.zero_grad()
        loss_of().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_mean_loss_weights_batches_by_labelled_tokens():
    model = build_model("olmoe")
    batches = [labelled(b, s) for b, s in zip(random_batches(2), [(10, 6), (2, 2)], strict=True)]
    with torch.no_grad():
        losses = [model(**b).loss.item() for b in batches]
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    expected = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    assert mean_loss(model, batches) == pytest.approx(expected, rel=1e-5)


def test_a_proximal_anchor_with_other_parameter_names_is_refused():
    model = build_model("mixtral")
    named = dict(model.named_parameters())
    anchor = {f"wrapper.{name}": p.detach().clone() for name, p in named.items()}
    batches = iter([labelled(b, (4, 4)) for b in random_batches(1)])
    with pytest.raises(
        FlexMoEError, match=r"the proximal anchor names \d+ parameters the model does not train"
    ):
        train_steps(model, batches, 1, 1e-3, anchor=anchor, proximal_mu=0.1)
