"""Threat models beyond one gradient: FedAvg, aggregation, closed-form recovery and updates from files."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lightning_inversion as li
from lightning_inversion.cli import main
from lightning_inversion.client import Client
from lightning_inversion.images import normalize
from lightning_inversion.update_io import UpdateFileError, load_update, save_update

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def hand_written_fedavg(victim, images, labels, steps, lr, batch):
    model = copy.deepcopy(victim)
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(steps):
        i = step % (len(images) // batch)
        loss = F.cross_entropy(
            model(images[i * batch : (i + 1) * batch]), labels[i * batch : (i + 1) * batch]
        )
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= lr * g
    return [p.detach() - s for p, s in zip(model.parameters(), start)], [
        p.detach() for p in model.parameters()
    ]


@pytest.mark.parametrize("batch", [2, 4])
def test_fedavg_update_equals_a_hand_written_sgd_loop(tiny_victim, batch):
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 1])
    delta, weights = hand_written_fedavg(tiny_victim, images, labels, steps=3, lr=0.1, batch=batch)
    client = Client(protocol="fedavg", local_steps=3, local_lr=0.1, local_batch_size=batch)
    update = client.update(tiny_victim, images, labels)
    assert update.kind == "delta"
    for ours, theirs in zip(update.tensors, delta):
        assert torch.allclose(ours, theirs, atol=1e-6)
    sent = Client(protocol="fedavg", local_steps=3, local_lr=0.1, local_batch_size=batch, send="weights")
    for ours, theirs in zip(sent.update(tiny_victim, images, labels).tensors, weights):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_local_epochs_set_the_number_of_steps():
    assert Client(protocol="fedavg", local_epochs=2, local_batch_size=2).steps_for(8) == 8


def test_secure_aggregation_is_the_average_of_the_clients_updates(tiny_victim):
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    client = Client(protocol="fedavg", local_steps=2, local_lr=0.1)
    first = client.update(tiny_victim, images[:2], labels[:2]).tensors
    second = client.update(tiny_victim, images[2:], labels[2:]).tensors
    aggregate = Client(protocol="fedavg", local_steps=2, local_lr=0.1, num_clients=2).update(
        tiny_victim, images, labels
    )
    assert aggregate.num_clients == 2
    for a, f, s in zip(aggregate.tensors, first, second):
        assert torch.allclose(a, (f + s) / 2, atol=1e-7)
    with pytest.raises(ValueError, match="split evenly"):
        Client(num_clients=3).update(tiny_victim, images, labels)


def test_reconstruction_from_a_three_step_fedavg_update(tiny_victim, cat16):
    client = Client(protocol="fedavg", local_steps=3, local_lr=1e-2)
    update = client.update(tiny_victim, normalize(cat16, MEAN, STD), torch.tensor([3]))
    result = li.reconstruct(
        tiny_victim,
        update,
        image_shape=(3, 16, 16),
        mean=MEAN,
        std=STD,
        max_steps=300,
        tv=1e-4,
        client=client,
        label_strategy="idlg",
        ground_truth=cat16,
    )
    assert result.labels.tolist() == [3]  # iDLG respects the sign of an update
    assert result.metrics["psnr"] > 17.0


def test_closed_form_recovery_through_the_cli_is_exact(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/analytic.yaml"),
            "--report.lpips=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["mse"] < 1e-10 and metrics["analytic_feature_error"] < 1e-4
    assert metrics["attack"]["steps"] == 0


def test_an_update_file_from_outside_is_attacked_through_the_cli(tmp_path):
    victim = li.build_victim("LeNet-Zhu", 8, (3, 32, 32))
    torch.save(victim.state_dict(), tmp_path / "victim.pt")
    update = Client().update(victim, torch.randn(1, 3, 32, 32), torch.tensor([5]))
    update.labels = None  # the server does not know the label: iDLG recovers it
    save_update(update, tmp_path / "update.safetensors")
    args = [
        "fit",
        "--model.victim=LeNet-Zhu",
        f"--model.victim_weights={tmp_path / 'victim.pt'}",
        "--model.label_strategy=idlg",
        f"--update={tmp_path / 'update.safetensors'}",
        "--trainer.max_steps=2",
        "--report.lpips=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = main(args)
    assert cli.model.target_labels.tolist() == [5]
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["attack"]["steps"] == 2 and "psnr" not in metrics  # no ground truth for a real update
    # A file that does not fit the victim names the tensor that does not fit.
    bad = load_update(tmp_path / "update.safetensors")
    bad.tensors[2] = torch.zeros(3, 3)
    save_update(bad, tmp_path / "bad.safetensors")
    with pytest.raises(UpdateFileError, match=r"body\.2|index 2|tensor 2"):
        main(
            [a if not a.startswith("--update=") else f"--update={tmp_path / 'bad.safetensors'}" for a in args]
        )
