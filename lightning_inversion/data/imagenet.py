"""ImageNet (ILSVRC2012) from a local folder in ImageFolder layout; it cannot be downloaded automatically."""

from __future__ import annotations

import os

from jsonargparse.typing import PositiveInt
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.folder import is_image_file
from torchvision.transforms import v2

from ..images import IMAGENET_MEAN, IMAGENET_STD
from .base import MissingDataError, VisionData, check_whole
from .folder import load_rgb
from .torchvision_sets import to_normalized_tensor

HOW_TO_GET_IMAGENET = (
    "ImageNet cannot be downloaded automatically. Get ILSVRC2012_img_val.tar (and ILSVRC2012_img_train.tar to "
    "train a victim) from https://image-net.org/download-images (free account, non-commercial terms), extract "
    "the validation images into {root}/val/ and sort them into one folder per class named by WordNet ID "
    "({root}/val/n01440764/ILSVRC2012_val_00000293.JPEG, ...), e.g. with the valprep.sh script of "
    "https://github.com/soumith/imagenetloader.torch or the devkit's ground-truth labels; extract the training "
    "archive's per-class tars into {root}/train/<wnid>/. A subset of the classes or images is fine."
)


def class_folders(path: str) -> list[str]:
    """The names of the visible sub-folders of ``path`` (sorted), or ``[]`` when it is not a folder."""
    if not os.path.isdir(path):
        return []
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


class _ClassFolders(datasets.ImageFolder):
    """An ImageFolder with a given class list, so that train and val agree on labels."""

    def __init__(self, root: str, classes: list[str], transform: v2.Transform) -> None:
        self._given_classes = classes
        super().__init__(root, transform=transform, loader=load_rgb, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}


class ImageNetData(VisionData):
    """ImageNet from ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``; attack targets come from val.

    Labels are the index of the class folder among the sorted class folders of train and val together: with all
    1000 classes this is the standard ImageNet index that torchvision's pretrained weights use. ``num_classes``
    is the number of class folders found (1000 while the folder is absent).

    Args:
        root: the ImageNet folder holding ``train/`` and ``val/``.
        image_size: the side of the square images. Validation resizes the short side to
            ``image_size * 256 / 224`` and centre-crops; training uses a random resized crop and flip.
        **kwargs: see :class:`VisionData`.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, root: str = "data/imagenet", image_size: PositiveInt = 224, **kwargs) -> None:
        super().__init__(root=root, **kwargs)
        check_whole("image_size", image_size, 1)
        self.image_size = int(image_size)
        self.image_shape = (3, self.image_size, self.image_size)

    @property
    def classes(self) -> list[str]:
        """The class folders (WordNet IDs) of train and val together, sorted."""
        return sorted(
            set(class_folders(self._split_path("train"))) | set(class_folders(self._split_path("val")))
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes) or 1000

    def _split_path(self, split: str) -> str:
        return os.path.join(self.root, split)

    def _open(self, split: str, transform: v2.Transform) -> Dataset:
        path = self._split_path(split)
        how = HOW_TO_GET_IMAGENET.format(root=self.root)
        if not os.path.isdir(path):
            raise MissingDataError(f"ImageNet's {split} split is not at {path}. {how}")
        classes = self.classes
        dataset = _ClassFolders(path, classes, transform) if class_folders(path) else None
        if dataset is None or len(dataset) == 0:
            with os.scandir(path) as it:
                loose = any(e.is_file() and is_image_file(e.name) for e in it)
            problem = "holds images but no class folders" if loose else "has no images in class folders"
            raise MissingDataError(f"ImageNet's {split} split at {path} {problem}. {how}")
        return dataset

    def train_set(self) -> Dataset:
        transform = v2.Compose(
            [
                v2.RandomResizedCrop(self.image_size),
                v2.RandomHorizontalFlip(),
                *to_normalized_tensor(self.mean, self.std),
            ]
        )
        return self._cached("train", lambda: self._open("train", transform))

    def target_set(self) -> Dataset:
        transform = v2.Compose(
            [
                v2.Resize(round(self.image_size * 256 / 224)),
                v2.CenterCrop(self.image_size),
                *to_normalized_tensor(self.mean, self.std),
            ]
        )
        return self._cached("target", lambda: self._open("val", transform))
