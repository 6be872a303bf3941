"""Shared fixtures: tiny victims and real photos that load offline (scikit-image ships them)."""

import logging

import pytest
import torch
from torch import nn

from lightning_inversion.data.photos import center_square, load_photo


class TinyConvNet(nn.Module):
    """A small victim that is not one of the project's own: conv, ReLU, pool, linear."""

    def __init__(self, channels: int = 3, num_classes: int = 10, side: int = 16, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(width * (side // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    torch.manual_seed(0)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    yield


@pytest.fixture
def cat16() -> torch.Tensor:
    """scikit-image's cat photo, 16×16, pixels in [0, 1], shape (1, 3, 16, 16)."""
    return center_square(load_photo("chelsea"), 16)[None]


@pytest.fixture
def tiny_victim() -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().eval()
