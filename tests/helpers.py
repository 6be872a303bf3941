"""Helpers shared by several test modules (fixtures live in ``conftest.py``)."""

import time

import pytorch_lightning as pl
import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A small victim that is not one of the project's own: conv, ReLU, pool, linear."""

    def __init__(self, channels: int = 3, num_classes: int = 10, side: int = 16, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(width * (side // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class Pace(pl.Callback):
    """Sleeps after every step, so a test can signal a run in a subprocess while it still has steps to go."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


class StopInFit(pl.Callback):
    """Stops the ``fit``-th fit of a run after ``step`` steps as a SIGTERM does (Lightning's ``SIGTERMException``)."""

    def __init__(self, fit: int = 2, step: int = 1) -> None:
        self.fit, self.step, self.fits = fit, step, 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fits += 1

    def on_train_batch_end(self, trainer, *args) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if self.fits == self.fit and trainer.global_step >= self.step:
            raise SIGTERMException
