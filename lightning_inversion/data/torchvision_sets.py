"""CIFAR-10, CIFAR-100 and MNIST: torchvision's datasets, downloaded once and then read from ``root``."""

from __future__ import annotations

import http.client
import os
import socket
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from ..images import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, MNIST_MEAN, MNIST_STD
from .base import MissingDataError, VisionData

# What a failed download raises: URLError and socket timeouts are OSErrors; torchvision raises RuntimeError for
# md5 mismatches and for MNIST when every mirror failed.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, EOFError, tarfile.TarError, http.client.HTTPException)
_DOWNLOAD_TIMEOUT_S = 30.0


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets a default timeout while downloading, so a firewalled machine fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def to_normalized_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    """PIL image → plain float tensor in [0, 1] → normalised with the dataset's own constants."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]


class TorchvisionData(VisionData):
    """A torchvision dataset with ``train`` and test splits; the test split holds the attack targets.

    Subclasses set ``dataset_class``, ``title``, ``folder`` (where torchvision keeps the files, relative to
    ``root``), ``files`` (the file names it expects there) and ``source`` (where the files come from).

    Args:
        download: download the dataset to ``root`` when it is not there yet.
        **kwargs: see :class:`VisionData`.
    """

    dataset_class: type[Dataset]
    title: str
    folder: str
    files: tuple[str, ...]
    source: str

    def __init__(self, download: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.download = download

    @property
    def data_path(self) -> str:
        """The folder torchvision reads the files from."""
        return os.path.join(self.root, self.folder)

    def train_transform(self) -> v2.Transform:
        """Training augmentation: random crop with padding 4 and a horizontal flip."""
        return v2.Compose(
            [
                v2.RandomCrop(self.image_shape[1:], padding=4),
                v2.RandomHorizontalFlip(),
                *to_normalized_tensor(self.mean, self.std),
            ]
        )

    def train_set(self) -> Dataset:
        return self._cached("train", lambda: self._open(train=True, transform=self.train_transform()))

    def target_set(self) -> Dataset:
        transform = v2.Compose(to_normalized_tensor(self.mean, self.std))
        return self._cached("target", lambda: self._open(train=False, transform=transform))

    def prepare_data(self) -> None:
        """Download the dataset if needed (Lightning calls this on one process only)."""
        self._open(train=False, transform=None)

    def _open(self, train: bool, transform: v2.Transform | None) -> Dataset:
        """The split from disk, downloading it first when it is missing and ``download`` is on."""
        try:
            return self.dataset_class(self.root, train=train, transform=transform, download=False)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            pass
        if not self.download:
            raise MissingDataError(self._missing_message("download is off (download=False)")) from None
        try:
            with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
                return self.dataset_class(self.root, train=train, transform=transform, download=True)
        except _DOWNLOAD_ERRORS as err:
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise MissingDataError(self._missing_message(f"the download failed ({reason})")) from None

    def _missing_message(self, reason: str) -> str:
        make = f"torchvision.datasets.{self.dataset_class.__name__}('data', download=True)"
        return (
            f"{self.title} is not at {self.data_path} (expected the files {', '.join(self.files)}) and {reason}. "
            f'To provide it, either run `python -c "import torchvision; {make}"` once on a machine with network '
            f"access and copy the folder data/{self.folder} it creates to {self.data_path}, or copy the "
            f"torchvision-layout files to {self.data_path} yourself: {self.source}."
        )


class CIFAR10Data(TorchvisionData):
    """CIFAR-10 (32×32 colour, 10 classes): victims train on the 50k training images, targets come from the
    10k test images.

    Args:
        **kwargs: see :class:`TorchvisionData` and :class:`VisionData`.
    """

    mean = CIFAR10_MEAN
    std = CIFAR10_STD
    num_classes = 10
    image_shape = (3, 32, 32)
    dataset_class = datasets.CIFAR10
    title = "CIFAR-10"
    folder = "cifar-10-batches-py"
    files = ("data_batch_1", "...", "data_batch_5", "test_batch", "batches.meta")
    source = "extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, which holds that folder"


class CIFAR100Data(TorchvisionData):
    """CIFAR-100 (32×32 colour, 100 fine labels): training on the 50k training images, targets from the 10k
    test images.

    Args:
        **kwargs: see :class:`TorchvisionData` and :class:`VisionData`.
    """

    mean = CIFAR100_MEAN
    std = CIFAR100_STD
    num_classes = 100
    image_shape = (3, 32, 32)
    dataset_class = datasets.CIFAR100
    title = "CIFAR-100"
    folder = "cifar-100-python"
    files = ("train", "test", "meta")
    source = "extract https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, which holds that folder"


class MNISTData(TorchvisionData):
    """MNIST (28×28 grey digits, 10 classes): training on the 60k training images, targets from the 10k test
    images. Training augmentation is a random crop with padding 4, without flips (digits are not symmetric).

    Args:
        **kwargs: see :class:`TorchvisionData` and :class:`VisionData`.
    """

    mean = MNIST_MEAN
    std = MNIST_STD
    num_classes = 10
    image_shape = (1, 28, 28)
    dataset_class = datasets.MNIST
    title = "MNIST"
    folder = os.path.join("MNIST", "raw")
    files = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    source = "the four files from https://ossci-datasets.s3.amazonaws.com/mnist/ (<name>.gz), uncompressed"

    def train_transform(self) -> v2.Transform:
        return v2.Compose([v2.RandomCrop(28, padding=4), *to_normalized_tensor(self.mean, self.std)])
