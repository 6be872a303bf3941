"""Flower clients as Flower users write them, and an in-process stand-in for the network (no ray, no sockets).

The networks are importable by class path (``tests.flower_helpers.TutorialNet``) for the command line.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from flwr.client import NumPyClient
from flwr.server.client_proxy import ClientProxy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TutorialNet(nn.Module):
    """The CNN of Flower's and PyTorch's CIFAR-10 tutorials (no BatchNorm)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BNNet(nn.Module):
    """The tutorial CNN with a BatchNorm layer after each convolution."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def get_weights(net: nn.Module) -> list[np.ndarray]:
    return [v.cpu().numpy() for v in net.state_dict().values()]


def set_weights(net: nn.Module, arrays: list[np.ndarray]) -> None:
    state = OrderedDict((k, torch.tensor(v)) for k, v in zip(net.state_dict().keys(), arrays, strict=True))
    net.load_state_dict(state, strict=True)


class FlowerClient(NumPyClient):
    """A Flower client as in Flower's PyTorch quickstart: ``net.train()``, SGD over a DataLoader.

    FedSGD (``fedsgd=True``) sends the gradient of one pass over the whole batch instead of new weights.
    """

    def __init__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        epochs: int = 1,
        batch_size: int | None = None,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fedsgd: bool = False,
    ) -> None:
        self.net, self.images, self.labels = net, images, labels
        self.epochs, self.batch_size, self.lr = epochs, batch_size or len(images), lr
        self.momentum, self.weight_decay, self.fedsgd = momentum, weight_decay, fedsgd

    def get_parameters(self, config):
        return get_weights(self.net)

    def fit(self, parameters, config):
        set_weights(self.net, parameters)
        self.net.train()
        if self.fedsgd:
            self.net.zero_grad()
            F.cross_entropy(self.net(self.images), self.labels).backward()
            return [p.grad.numpy().copy() for p in self.net.parameters()], len(self.images), {}
        loader = DataLoader(
            TensorDataset(self.images, self.labels), batch_size=self.batch_size, shuffle=False
        )
        optimizer = torch.optim.SGD(
            self.net.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        for _ in range(self.epochs):
            for x, y in loader:
                optimizer.zero_grad()
                F.cross_entropy(self.net(x), y).backward()
                optimizer.step()
        return get_weights(self.net), len(loader.dataset), {"loss": 0.0}


class InProcessProxy(ClientProxy):
    """What the Flower server talks to, here the client itself in the same process."""

    def __init__(self, cid: str, client: NumPyClient) -> None:
        super().__init__(cid)
        self.client = client.to_client()

    def fit(self, ins, timeout, group_id):
        return self.client.fit(ins)

    def get_parameters(self, ins, timeout, group_id):
        return self.client.get_parameters(ins)

    def get_properties(self, ins, timeout, group_id):
        return self.client.get_properties(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError
