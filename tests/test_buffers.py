"""BatchNorm statistics of the private batch, solved from the buffers a client sends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_inversion.buffers import RecoveredStatistics, solve_batch_statistics
from lightning_inversion.client import Client
from lightning_inversion.errors import InputError


def bn_net(momentum: float | None = 0.1) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.BatchNorm2d(8, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 16),
        nn.BatchNorm1d(16, momentum=momentum),
        nn.Linear(16, 4),
    )
    with torch.no_grad():  # global statistics that are not the defaults, as after earlier rounds
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return net


def true_statistics(net: nn.Module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm layer's input statistics over the batch (biased variance), by forward hooks."""
    found = {}

    def hook(name):
        def record(module, args):
            x = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)  # (C, n)
            found[name] = (x.mean(1), x.var(1, unbiased=False))

        return record

    handles = [
        m.register_forward_pre_hook(hook(name))
        for name, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    net.train()
    with torch.no_grad():
        net(images)
    for h in handles:
        h.remove()
    return found


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_one_step_gives_the_batch_statistics_exactly(momentum, protocol):
    net = bn_net(momentum)
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    truth = true_statistics(bn_net(momentum), images)
    client = Client(protocol=protocol, local_steps=1, local_lr=0.1, train_mode=True, send="weights")
    update = client.update(net, images, torch.tensor([0, 1, 2]))
    assert update.buffers_moved
    recovered = RecoveredStatistics().statistics(net, update)
    assert set(recovered) == {"1", "4", "8"}
    for name, (mean, var) in recovered.items():
        torch.testing.assert_close(mean, truth[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, truth[name][1], rtol=1e-4, atol=1e-5)
    # the biased variance, not the unbiased one PyTorch puts in running_var (n = 3 · 3 · 3 in layer "4")
    unbiased = truth["4"][1] * 27 / 26
    assert not torch.allclose(recovered["4"][1], unbiased, rtol=1e-3)


def test_several_steps_give_the_average_of_the_steps_statistics():
    net = bn_net()
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    truth = true_statistics(bn_net(), images)
    update = Client(protocol="fedavg", local_steps=5, local_lr=1e-3, train_mode=True).update(
        net, images, torch.tensor([0, 1, 2, 3])
    )
    recovered = RecoveredStatistics(image_shape=(3, 8, 8)).statistics(net, update)
    for name, (mean, var) in recovered.items():  # the weights hardly move: the statistics hardly change
        torch.testing.assert_close(mean, truth[name][0], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(var, truth[name][1], rtol=1e-2, atol=1e-2)


def test_solve_inverts_torch_update_by_hand():
    bn = nn.BatchNorm1d(2, momentum=0.2)
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.tensor([[1.0, 2.0], [3.0, -2.0], [5.0, 0.0]])
    bn.train()
    bn(x)
    mean, var = solve_batch_statistics(
        old_mean, old_var, bn.running_mean - old_mean, bn.running_var - old_var, n=3, momentum=0.2
    )
    torch.testing.assert_close(mean, torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(var, torch.tensor([8 / 3, 8 / 3]))


def test_an_eval_mode_update_has_no_statistics_to_recover():
    net = bn_net()
    update = Client(train_mode=False).update(net, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert not update.buffers_moved
    with pytest.raises(InputError, match="running statistics moved"):
        RecoveredStatistics().statistics(net, update)


@pytest.mark.slow
def test_resnet18_statistics_are_recovered_at_every_batchnorm_layer():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=8)
    images = torch.randn(2, 3, 32, 32)
    update = Client(protocol="fedsgd", train_mode=True).update(net, images, torch.tensor([1, 2]))
    recovered = RecoveredStatistics().statistics(net, update)
    truth = true_statistics(
        net, images
    )  # the update ran on copies of the buffers: net still holds the globals
    assert len(recovered) == 20
    for name, (mean, var) in recovered.items():
        torch.testing.assert_close(mean, truth[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, truth[name][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_dummy_statistics_of_minibatch_steps_are_the_ones_the_buffers_absorb(momentum):
    """FedAvg over minibatches: the statistics the client pass hands to the priors summarise every step's batch
    as the running statistics do, so at the private images they equal what RecoveredStatistics solves from the
    buffers (the first minibatch alone would leave the other images without any pull)."""
    from lightning_inversion.client import BATCHNORM_STATISTICS

    net = bn_net(momentum)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    client = Client(protocol="fedavg", local_batch_size=2, local_epochs=1, local_lr=1e-6, train_mode=True)
    update = client.update(net, images, labels)
    recovered = RecoveredStatistics().statistics(net, update)
    params, buffers = dict(net.named_parameters()), {n: b.clone() for n, b in net.named_buffers()}
    seen = {BATCHNORM_STATISTICS: {}}
    with torch.no_grad():
        client.simulate(net, params, buffers, images, labels, seen=seen)
    assert set(seen[BATCHNORM_STATISTICS]) == set(recovered)
    for name, (mean, var) in recovered.items():
        torch.testing.assert_close(seen[BATCHNORM_STATISTICS][name][0], mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(seen[BATCHNORM_STATISTICS][name][1], var, rtol=1e-4, atol=1e-4)
