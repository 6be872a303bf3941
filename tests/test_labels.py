"""Label recovery (iDLG and batch label counts) from real client updates of small untrained victims."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_inversion.client import Client
from lightning_inversion.labels import batch_label_counts, idlg_label

NUM_CLASSES = 10


def make_victim(seed: int, last_scale: float = 1.0) -> nn.Sequential:
    """A tiny CNN: conv + ReLU + avgpool + flatten + Linear(…, 10), untrained, seeded."""
    torch.manual_seed(seed)
    victim = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, NUM_CLASSES),
    )
    with torch.no_grad():  # a small last layer: near-uniform softmax, as at random init of a deep network
        victim[-1].weight.mul_(last_scale)
    return victim


def make_images(seed: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + seed))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("label", [0, 3, 9])
def test_idlg_recovers_label_from_gradient(seed: int, label: int) -> None:
    victim = make_victim(seed)
    update = Client().update(victim, make_images(seed, 1), torch.tensor([label]))
    assert update.kind == "gradient"
    assert idlg_label(update.tensors[-2]) == label


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("label", [2, 7])
def test_idlg_recovers_label_from_fedavg_delta(seed: int, label: int) -> None:
    victim = make_victim(seed)
    client = Client(protocol="fedavg", local_steps=3, local_lr=1e-2)
    update = client.update(victim, make_images(seed, 1), torch.tensor([label]))
    assert update.kind == "delta"
    assert idlg_label(update.tensors[-2], kind="delta") == label
    # the sign flip matters: read as a gradient, the delta points at another class
    assert idlg_label(update.tensors[-2], kind="gradient") != label


def test_idlg_weights_kind_uses_the_change() -> None:
    victim = make_victim(0)
    before = [p.detach().clone() for p in victim.parameters()]
    client = Client(protocol="fedavg", local_steps=2, local_lr=1e-2, send="weights")
    update = client.update(victim, make_images(0, 1), torch.tensor([5]))
    assert idlg_label(update.tensors[-2] - before[-2], kind="weights") == 5


CASES = [[1, 1, 4, 7], [0, 0, 0, 2], [3, 5, 6, 8], [9, 9, 9, 9], [2, 4, 4, 6]]


@pytest.mark.parametrize("labels", CASES)
@pytest.mark.parametrize("seed", range(4))
def test_batch_label_counts_exact_multiset(labels: list[int], seed: int) -> None:
    victim = make_victim(seed, last_scale=0.01)
    y = torch.tensor(labels)[
        torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    ]  # order unknown
    update = Client().update(victim, make_images(seed, 4), y)
    weight, bias = update.tensors[-2], update.tensors[-1]
    expected = torch.tensor(sorted(labels))
    found = batch_label_counts(weight, bias, num_images=4)
    assert found.dtype == torch.long and torch.equal(found, expected)
    # without the bias (weight-row sums only)
    assert torch.equal(batch_label_counts(weight, None, num_images=4), expected)


@pytest.mark.parametrize("seed", range(3))
def test_batch_label_counts_default_init_and_fedavg(seed: int) -> None:
    """Default-initialised last layer, and a FedAvg delta (unknown η and steps), with duplicates."""
    labels = torch.tensor([1, 1, 4, 7])
    victim = make_victim(seed)
    for client in (Client(), Client(protocol="fedavg", local_steps=3, local_lr=1e-2)):
        update = client.update(victim, make_images(seed, 4), labels)
        for bias in (update.tensors[-1], None):
            found = batch_label_counts(update.tensors[-2], bias, 4, kind=update.kind)
            assert torch.equal(found, labels), (client.protocol, bias is None, found)


@pytest.mark.parametrize("seed", range(3))
def test_batch_label_counts_random_batches_of_eight(seed: int) -> None:
    """Random labels (duplicates likely), B = 8 of K = 10."""
    labels = torch.randint(0, NUM_CLASSES, (8,), generator=torch.Generator().manual_seed(50 + seed))
    update = Client().update(make_victim(seed, last_scale=0.01), make_images(seed, 8), labels)
    found = batch_label_counts(update.tensors[-2], update.tensors[-1], num_images=8)
    assert torch.equal(found, labels.sort().values)


def test_batch_of_one_agrees_with_idlg() -> None:
    update = Client().update(make_victim(1), make_images(1, 1), torch.tensor([6]))
    assert batch_label_counts(update.tensors[-2], update.tensors[-1], 1).tolist() == [6]


def test_batch_label_counts_total_and_present_classes() -> None:
    """Rounding: the total is exactly B and every class with a negative row sum keeps a label."""
    weight = torch.zeros(5, 3)
    weight[:, 0] = torch.tensor([-0.30, -0.01, 0.10, 0.11, 0.10])  # classes 0 and 1 negative
    found = batch_label_counts(weight, None, num_images=5)
    assert found.numel() == 5
    assert {0, 1} <= set(found.tolist())
    assert int((found == 0).sum()) > int((found == 1).sum())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_images"):
        batch_label_counts(torch.zeros(10, 4))
    with pytest.raises(ValueError, match="kind"):
        idlg_label(torch.zeros(10, 4), kind="gradients")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        batch_label_counts(torch.zeros(10, 4), torch.zeros(9), num_images=2)
    with pytest.raises(ValueError, match="shape"):
        idlg_label(torch.zeros(10))
