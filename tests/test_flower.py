"""Updates from a real Flower stack: ``flwr.client.NumPyClient`` trained as Flower users train, saved as users save.

Each update loads, the simulated client reproduces it (cosine > 0.9999), and the attack runs on it from the
command line; the strategy wrapper records a 2-round, 2-client federation run by Flower's own server in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.common import ndarrays_to_parameters  # noqa: E402

from lightning_inversion.api import reconstruct  # noqa: E402
from lightning_inversion.buffers import RecoveredStatistics  # noqa: E402
from lightning_inversion.cli import main  # noqa: E402
from lightning_inversion.client import Client  # noqa: E402
from lightning_inversion.errors import InputError  # noqa: E402
from lightning_inversion.update_io import as_change, load_update  # noqa: E402
from tests.flower_helpers import BNNet, FlowerClient, InProcessProxy, TutorialNet, get_weights  # noqa: E402

SETTINGS = {  # Flower client options, and the Client that simulates them
    "fedsgd": ({"fedsgd": True}, {"protocol": "fedsgd"}),
    "fedavg1": (
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
        {"protocol": "fedavg", "local_steps": 1, "local_lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
    ),
    "fedavg5": (
        {"lr": 0.01, "momentum": 0.9, "epochs": 5},
        {"protocol": "fedavg", "local_steps": 5, "local_lr": 0.01, "momentum": 0.9},
    ),
    "minibatches": (
        {"lr": 0.01, "momentum": 0.9, "epochs": 2, "batch_size": 2},
        {"protocol": "fedavg", "local_epochs": 2, "local_batch_size": 2, "local_lr": 0.01, "momentum": 0.9},
    ),
}


def make(net_class, seed: int = 0, num_classes: int = 8):
    torch.manual_seed(seed)
    if net_class == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=num_classes)
    return net_class(num_classes=num_classes)


def private_batch(num_images: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, 32, 32, generator=gen), torch.arange(num_images) % 8


def flower_round(net_class, setting: str, images, labels):
    """The global weights and what Flower's client sends back, as Flower's server gets them."""
    server_net = make(net_class)
    global_arrays = get_weights(server_net)
    flower_options, _ = SETTINGS[setting]
    numpy_client = FlowerClient(make(net_class, seed=5), images, labels, **flower_options)
    sent, num_examples, _ = numpy_client.fit([a.copy() for a in global_arrays], {})
    return server_net, global_arrays, sent, num_examples


def save(kind_of_file: str, path: Path, sent, global_arrays, names, param_names):
    """Save what the client sent as a Flower user might: returns the file and the kind to declare."""
    grads = len(sent) == len(param_names) and len(sent) != len(names)  # FedSGD: parameters only
    keys = param_names if grads else names
    if kind_of_file == "npz":
        np.savez(path.with_suffix(".npz"), *sent)
        return path.with_suffix(".npz"), None
    if kind_of_file == "torch_list":
        torch.save([torch.tensor(a) for a in sent], path.with_suffix(".pt"))
        return path.with_suffix(".pt"), None
    if kind_of_file == "named_dict":
        torch.save({k: torch.tensor(a) for k, a in zip(keys, sent, strict=True)}, path.with_suffix(".pt"))
        return path.with_suffix(".pt"), None
    assert kind_of_file == "delta" and not grads
    np.savez(path.with_suffix(".npz"), *[s - g for s, g in zip(sent, global_arrays, strict=True)])
    return path.with_suffix(".npz"), "delta"


def cosine(a, b) -> float:
    x = torch.cat([t.double().reshape(-1) for t in a])
    y = torch.cat([t.double().reshape(-1) for t in b])
    return float(x @ y / (x.norm() * y.norm()))


CASES = [
    (net, setting, kind_of_file)
    for net in (TutorialNet, BNNet)
    for setting in SETTINGS
    for kind_of_file in ("npz", "torch_list", "named_dict", "delta")
    if not (setting == "fedsgd" and kind_of_file == "delta")
]


@pytest.mark.parametrize(
    "net_class, setting, kind_of_file", CASES, ids=[f"{n.__name__}-{s}-{k}" for n, s, k in CASES]
)
def test_flower_updates_load_and_the_client_reproduces_them(tmp_path, net_class, setting, kind_of_file):
    check_reproduced(tmp_path, net_class, setting, kind_of_file)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["fedsgd", "fedavg1", "fedavg5"])
def test_resnet18_updates_load_and_the_client_reproduces_them(tmp_path, setting):
    check_reproduced(tmp_path, "resnet18", setting, "npz", num_images=2)


def check_reproduced(tmp_path, net_class, setting, kind_of_file, num_images=4):
    images, labels = private_batch(num_images)
    server_net, global_arrays, sent, num_examples = flower_round(net_class, setting, images, labels)
    assert num_examples == num_images
    names = list(server_net.state_dict().keys())
    param_names = [n for n, _ in server_net.named_parameters()]
    path, declared = save(kind_of_file, tmp_path / "update", sent, global_arrays, names, param_names)
    _, options = SETTINGS[setting]
    kind = "gradient" if setting == "fedsgd" else declared or "weights"
    update = load_update(path, server_net, default_kind=kind)
    assert update.names == param_names and update.kind == kind
    assert not set(update.buffer_changes) & set(update.names)  # buffers are never parameters
    with_buffers = len(sent) == len(names) and len(names) > len(param_names)
    assert bool(update.buffer_changes) == with_buffers
    if with_buffers:  # Flower's client trains in train mode: BatchNorm's statistics moved
        assert update.buffers_moved
        counter = next(b for n, b in update.buffer_changes.items() if n.endswith("num_batches_tracked"))
        assert int(counter) == Client(**options).steps_for(num_images)
    update = as_change(update, server_net)  # what the server sees: the change from the weights it sent
    simulated = Client(**options, train_mode=True).update(server_net, images, labels)
    assert cosine(update.tensors, simulated.tensors) > 0.9999
    if with_buffers:  # the running statistics moved as the simulated client's did; the step counters exactly
        assert update.buffer_changes.keys() == simulated.buffer_changes.keys()
        moved = [n for n, b in update.buffer_changes.items() if b.is_floating_point()]
        theirs = [update.buffer_changes[n] for n in moved]
        assert cosine(theirs, [simulated.buffer_changes[n] for n in moved]) > 0.9999
        for name in set(update.buffer_changes) - set(moved):
            assert torch.equal(update.buffer_changes[name], simulated.buffer_changes[name])
    # the same from Flower's own Parameters object, in memory
    in_memory = load_update(
        ndarrays_to_parameters(sent), server_net, default_kind="weights" if kind == "delta" else kind
    )
    assert cosine(as_change(in_memory, server_net).tensors, simulated.tensors) > 0.9999
    if kind_of_file == "npz":  # the attack runs on it (new weights: reconstruct takes the change itself)
        result = reconstruct(
            server_net.train(),
            load_update(path, server_net, default_kind=kind),
            image_shape=(3, 32, 32),
            num_images=num_images,
            max_steps=2,
            client=Client(**options, train_mode=True),
            ground_truth=images.sigmoid(),
        )
        assert result.steps == 2 and result.images.shape == images.shape


def test_a_flower_update_is_attacked_from_the_command_line_with_a_custom_victim(tmp_path):
    """BNNet given by class path, the global weights loaded into it, FedAvg with momentum, new weights: the
    client's train mode follows the moved buffers, and the data's private batch is recognised as the truth."""
    from lightning_inversion.data import PhotoData

    data = PhotoData(num_images=2)
    images, labels = data.attack_targets()
    server_net, global_arrays, sent, _ = flower_round(BNNet, "fedavg1", images, labels)
    np.savez(tmp_path / "global.npz", *global_arrays)
    np.savez(tmp_path / "update.npz", *sent)
    args = [
        "fit",
        "--model.victim=tests.flower_helpers.BNNet",
        f"--model.victim_weights={tmp_path / 'global.npz'}",
        "--data.num_images=2",
        f"--update={tmp_path / 'update.npz'}",
        "--client.protocol=fedavg",
        "--client.send=weights",
        "--client.local_steps=1",
        "--client.local_lr=0.01",
        "--client.momentum=0.9",
        "--client.weight_decay=5e-4",
        "--trainer.max_steps=3",
        "--report.lpips=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = main(args)
    assert cli.model.client.train_mode and cli.model.client.kind == "delta"
    assert cli.model.update.kind == "delta" and cli.model.update.buffers_moved
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["attack"]["steps"] == 3 and "psnr" in metrics  # the private batch made this update
    # A contradiction is named: buffers that moved, but a client declared in eval mode.
    with pytest.raises(InputError, match="train_mode False contradicts.*moved"):
        main([*args, "--client.train_mode=false"])
    # New weights declared a gradient.
    with pytest.raises(InputError, match="looks like new weights"):
        main([a for a in args if not a.startswith(("--client.send", "--client.protocol"))])
    # New weights without the global weights.
    with pytest.raises(InputError, match="global weights are needed"):
        main([a for a in args if not a.startswith("--model.victim_weights")])


def test_the_strategy_wrapper_records_a_federation_that_the_cli_attacks(tmp_path):
    """Flower's own server runs 2 rounds of FedAvg with 2 clients in-process; the recorder writes every update
    with its round, client and number of examples; round 2's update of client 1 is attacked from the command line
    without any --client option (the recorder wrote the client's settings)."""
    from flwr.server import Server
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.strategy import FedAvg

    from lightning_inversion.data import PhotoData
    from lightning_inversion.flower import UpdateRecorder

    images, labels = PhotoData(num_images=4).attack_targets()
    server_net = make(BNNet)
    client = Client(protocol="fedavg", local_steps=1, local_lr=0.01, momentum=0.9)
    recorder = UpdateRecorder(
        FedAvg(
            fraction_evaluate=0.0,
            min_fit_clients=2,
            min_available_clients=2,
            initial_parameters=ndarrays_to_parameters(get_weights(server_net)),
        ),
        tmp_path / "audit",
        client=client,
    )
    manager = SimpleClientManager()
    for cid in range(2):
        part = slice(2 * cid, 2 * cid + 2)
        flower_client = FlowerClient(make(BNNet, seed=9), images[part], labels[part], lr=0.01, momentum=0.9)
        manager.register(InProcessProxy(str(cid), flower_client))
    Server(client_manager=manager, strategy=recorder).fit(num_rounds=2, timeout=None)
    assert sorted(p.relative_to(tmp_path / "audit").as_posix() for p in recorder.recorded) == [
        "round_001/client_0.npz",
        "round_001/client_1.npz",
        "round_002/client_0.npz",
        "round_002/client_1.npz",
    ]
    round_2 = tmp_path / "audit" / "round_002"
    update = load_update(round_2 / "client_1.npz")
    assert update.kind == "weights" and update.num_images == 2
    assert update.meta["round"] == 2 and update.meta["client_id"] == "1" and update.meta["num_examples"] == 2
    args = [
        "fit",
        "--model.victim=tests.flower_helpers.BNNet",
        f"--model.victim_weights={round_2 / 'global.npz'}",
        "--data.num_images=2",
        "--data.start_index=2",
        f"--update={round_2 / 'client_1.npz'}",
        # the buffers used: the BatchNorm-statistics prior on the statistics solved from them
        '--model.priors=[{"class_path": "lightning_inversion.priors.BatchNormStatistics", "init_args": '
        '{"reference": {"class_path": "lightning_inversion.buffers.RecoveredStatistics"}}}]',
        "--trainer.max_steps=2",
        "--report.lpips=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = main(args)
    assert cli.model.client.momentum == 0.9 and cli.model.client.train_mode
    prior = next(p for p in cli.model.priors if type(p).__name__ == "BatchNormStatistics")
    truth = RecoveredStatistics().statistics(cli.model.victim, cli.model.update)
    prepared = prior.prepared["statistics"]
    assert prepared.keys() == truth.keys() == {"bn1", "bn2"}
    for name, (mean, var) in truth.items():
        torch.testing.assert_close(prepared[name][0].cpu(), mean)
        torch.testing.assert_close(prepared[name][1].cpu(), var)
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["attack"]["steps"] == 2 and "psnr" in metrics
    # --update_ground_truth false: no metrics, though the private batch made the update
    cli = main([*args, "--update_ground_truth=false", "--trainer.max_steps=1", "--model.priors=[]"])
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert "psnr" not in metrics
    # round 1's global weights are not the ones round 2's update was computed from
    with pytest.raises(InputError, match="other global weights"):
        main([*args[:2], f"--model.victim_weights={tmp_path / 'audit/round_001/global.npz'}", *args[3:]])
