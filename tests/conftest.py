"""Shared fixtures: tiny victims and real photos that load offline (scikit-image ships them)."""

import logging

import pytest
import torch

from lightning_inversion.data.photos import center_square, load_photo
from tests.helpers import TinyConvNet


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
def tiny_victim() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyConvNet().eval()
