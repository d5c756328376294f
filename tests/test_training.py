"""Local training's loss: the answer-only projection equals the model's own loss."""

import pytest
import torch

from flexmoe.data import IGNORE_INDEX
from flexmoe.errors import FlexMoEError
from flexmoe.methods import get_method
from flexmoe.training import (
    answer_loss,
    backward_in_parts,
    mean_loss,
    micro_batches,
    train_steps,
)
from tests.tiny_models import ARCHITECTURES, VOCAB, build_model, random_batches


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


def uneven_batch(seed: int) -> dict[str, torch.Tensor]:
    """Four right-padded rows of 12, 5, 9 and 3 tokens, with answers of 8, 1, 2 and 2 tokens."""
    lengths, answer_from = (12, 5, 9, 3), (4, 4, 7, 1)
    ids = torch.randint(2, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(12) < torch.tensor(lengths)[:, None]).long()
    return labelled({"input_ids": ids * mask, "attention_mask": mask}, answer_from)


def test_micro_batches_of_one_pad_nothing_and_keep_every_row():
    batch = uneven_batch(0)
    parts = micro_batches(batch, 1)
    assert [p["input_ids"].shape for p in parts] == [(1, 3), (1, 5), (1, 9), (1, 12)]
    assert all(bool(p["attention_mask"].all()) for p in parts)
    rows = sorted(tuple(p["input_ids"][0].tolist()) for p in parts)
    assert rows == sorted(tuple(r[r != 0].tolist()) for r in batch["input_ids"])
    assert [p["labels"].shape[1] for p in micro_batches(batch, 3)] == [9, 12]
    assert micro_batches(batch, 0)[0]["input_ids"] is batch["input_ids"]


def gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("micro_batch_size", [1, 2, 3])
def test_micro_batches_backpropagate_the_whole_batchs_gradient(micro_batch_size):
    batch = uneven_batch(0)
    unanswered = labelled(random_batches(1)[0], (12, 12))  # a row without answer tokens
    batch = {k: torch.cat([v, unanswered[k][:1]]) for k, v in batch.items()}
    model = build_model("qwen2_moe").train()
    answer_loss(model, batch).backward()
    whole = gradients(model)
    model.zero_grad()
    loss = backward_in_parts(model, batch, micro_batch_size)
    assert loss == pytest.approx(answer_loss(model, batch).item(), rel=1e-6)
    assert len(whole) > 0
    assert all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, gradients(model), strict=True)
    )


def test_a_batch_without_answer_tokens_is_refused():
    batch = labelled(random_batches(1)[0], (12, 12))
    with pytest.raises(FlexMoEError, match="a training batch has no answer tokens"):
        backward_in_parts(build_model("olmoe"), batch, 1)


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_micro_batches_train_the_same_steps_as_the_whole_batch(micro_batch_size):
    trained = []
    for size in (0, micro_batch_size):
        model = build_model("qwen2_moe")
        batches = iter([uneven_batch(seed) for seed in range(3)])
        anchor = {n: p.detach() + 0.1 for n, p in model.named_parameters()}  # FedProx's pull
        losses = train_steps(
            model, batches, 3, 1e-2, anchor, proximal_mu=0.5, micro_batch_size=size
        )
        trained.append((losses, [p.detach().clone() for p in model.parameters()]))
    (losses, whole), (losses_in_parts, in_parts) = trained
    assert losses_in_parts == pytest.approx(losses, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, in_parts, strict=True))
    untrained = build_model("qwen2_moe").parameters()
    assert not all(torch.equal(a, b) for a, b in zip(whole, untrained, strict=True))


def test_a_clients_round_takes_its_micro_batches(tmp_path, random_model, dolly_file, monkeypatch):
    from flexmoe import training
    from flexmoe.client import ClientWorker
    from flexmoe.federated.federation import initial_arrays
    from flexmoe.federated.records import arrays_to_state
    from flexmoe.settings import Settings

    forwards = []
    monkeypatch.setattr(
        training,
        "answer_loss",
        lambda model, batch: forwards.append(batch) or answer_loss(model, batch),
    )
    for size in (0, 1):
        config = Settings.of(
            model=str(random_model), data=str(dolly_file), clients=2, rounds=1, local_steps=2,
            batch_size=4, micro_batch_size=size, device="cpu",
        )  # fmt: skip
        worker = ClientWorker(config, 0, tmp_path / f"micro-{size}")
        shared = arrays_to_state(initial_arrays(config, get_method("flex")))
        worker.train(1, shared)
    assert [len(b["input_ids"]) for b in forwards] == [4, 4] + [1] * 8
    assert all(bool(b["attention_mask"].all()) for b in forwards[2:])


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
