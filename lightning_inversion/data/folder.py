"""Your own images as attack targets: a folder (flat or one sub-folder per class) or a list of files."""

from __future__ import annotations

import logging
import os

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, is_image_file
from torchvision.transforms.v2 import functional as TF

from ..errors import InputError
from ..images import IMAGENET_MEAN, IMAGENET_STD, normalize
from .base import MissingDataError, VisionData, check_whole
from .photos import center_square

log = logging.getLogger(__name__)


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB, with an error that names the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise MissingDataError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"cannot read image {path}: {err}") from None


def read_image(path: str) -> Tensor:
    """An image file as a float tensor ``(3, H, W)`` in [0, 1]."""
    return TF.to_dtype(TF.pil_to_tensor(load_rgb(path)), torch.float32, scale=True)


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def scan_folder(root: str) -> tuple[list[str], list[int] | None, list[str] | None]:
    """The images under ``root``: ``(paths, labels, classes)``; labels and classes are None for a flat folder.

    A folder holding images directly is flat; a folder holding only sub-folders is in ImageFolder layout (one
    sub-folder per class, in sorted order; images may sit deeper inside a class folder).
    """
    if not os.path.isdir(root):
        raise MissingDataError(f"image folder {root} does not exist")
    with os.scandir(root) as it:
        entries = _visible(list(it))
    flat = [e.path for e in entries if e.is_file() and is_image_file(e.name)]
    classes = [e.name for e in entries if e.is_dir()]
    class_paths, class_labels = [], []
    for label, name in enumerate(classes):
        for folder, dirs, names in os.walk(os.path.join(root, name), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # walk in sorted order
            for file_name in sorted(names):
                if is_image_file(file_name) and not file_name.startswith("."):
                    class_paths.append(os.path.join(folder, file_name))
                    class_labels.append(label)
    if flat and class_paths:
        raise InputError(
            f"{root} holds both images and class sub-folders with images; use either a flat folder of images "
            "or one sub-folder per class"
        )
    if flat:
        return flat, None, None
    if class_paths:
        return class_paths, class_labels, classes
    raise MissingDataError(
        f"no images in {root} (looked for files ending in {', '.join(IMG_EXTENSIONS)}, directly or in class "
        "sub-folders)"
    )


class ImageFiles(Dataset):
    """Image files, centre-square cropped and resized to ``size``, normalised, with their labels.

    Args:
        paths: the image files.
        labels: one label per file.
        size: the side of the square images.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        flip: flip each image horizontally with probability 1/2 (training augmentation).
    """

    def __init__(
        self,
        paths: list[str],
        labels: list[int],
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        flip: bool = False,
    ) -> None:
        self.paths, self.targets = paths, labels
        self.size, self.mean, self.std, self.flip = size, mean, std, flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = center_square(read_image(self.paths[i]), self.size)  # (3, size, size)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return normalize(image, self.mean, self.std), self.targets[i]


class ImageFolderData(VisionData):
    """Your own images as the client's private data: each is centre-square cropped and resized.

    Give either ``root`` (a flat folder of images, or one sub-folder per class as for torchvision's
    ``ImageFolder``) or ``files``. Images are ordered by path (class folders: class first), which is the order
    ``target_indices`` and ``start_index`` refer to. By default every image is a target: together they are the
    client's batch. The training split is the same images with random horizontal flips; the target split has no
    augmentation.

    Without class folders or ``labels`` the images have no labels: the client trains with label 0 for each,
    and the attack is not told them (``labels_known`` is False), so by default it recovers them from the update.

    Args:
        root: a folder of images: flat, or one sub-folder per class (labels = the sorted class folders' index).
        files: image files, as an alternative to a folder (relative to ``root`` when both are given).
        image_size: the side the images are resized to after the centre square crop.
        labels: one label per image for a flat folder or ``files``, known to the attacker (default: none; the
            client uses 0 for each and the attack recovers them).
        num_classes: the victim's number of classes (default: the number of class folders, else
            ``max(labels) + 1``, else 10).
        mean: per-channel normalisation mean the victim expects (default: ImageNet's).
        std: per-channel normalisation standard deviation (default: ImageNet's).
        **kwargs: see :class:`VisionData`; ``num_images`` defaults to every image (from ``start_index``).
    """

    def __init__(
        self,
        root: str | None = None,
        files: list[str] | None = None,
        image_size: PositiveInt = 32,
        labels: list[NonNegativeInt] | None = None,
        num_classes: PositiveInt | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        **kwargs,
    ) -> None:
        super().__init__(root=root or ".", **kwargs)
        if files:
            self.paths = [os.path.join(root, f) if root else f for f in files]
            for path in self.paths:
                if not os.path.isfile(path):
                    raise MissingDataError(f"image file {path} does not exist")
            folder_labels, self.classes = None, None
        elif root:
            self.paths, folder_labels, self.classes = scan_folder(root)
        else:
            raise InputError(
                "ImageFolderData needs a folder of images (root) or a list of image files (files)"
            )

        self.labels_known = folder_labels is not None or labels is not None
        if kwargs.get("num_images") is None:  # the default: every image, from start_index
            self.num_images = max(len(self.paths) - self.start_index, 1)
            if not self.target_indices:
                log.info(
                    "attacking all %d images as one client batch (choose with data.num_images, "
                    "data.start_index or data.target_indices)",
                    self.num_images,
                )
        if folder_labels is not None:
            if labels is not None:
                raise InputError(f"{root} has class sub-folders, which set the labels; drop `labels`")
            self.image_labels = folder_labels
            inferred = len(self.classes)
        elif labels is not None:
            if len(labels) != len(self.paths):
                raise InputError(f"got {len(labels)} labels for {len(self.paths)} images: give one per image")
            for y in labels:
                check_whole("labels", y, 0)
            self.image_labels = [int(y) for y in labels]
            inferred = max(self.image_labels) + 1
        else:
            self.image_labels = [0] * len(self.paths)
            inferred = 10
        if num_classes is not None:
            check_whole("num_classes", num_classes, 1)
        self.num_classes = int(num_classes) if num_classes is not None else inferred
        bad = sorted({y for y in self.image_labels if not 0 <= y < self.num_classes})
        if bad:
            raise InputError(
                f"labels {bad} are out of range for num_classes={self.num_classes} (0 to {self.num_classes - 1})"
            )
        if self.num_classes < 2:
            log.warning(
                "num_classes=%d: a one-class victim has zero cross-entropy gradients", self.num_classes
            )
        if len(mean) != 3 or len(std) != 3:
            raise InputError("mean and std need one value per colour channel (3)")
        check_whole("image_size", image_size, 1)
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = int(image_size)
        self.image_shape = (3, self.image_size, self.image_size)

    def train_set(self) -> Dataset:
        return self._cached(
            "train",
            lambda: ImageFiles(
                self.paths, self.image_labels, self.image_size, self.mean, self.std, flip=True
            ),
        )

    def target_set(self) -> Dataset:
        return self._cached(
            "target", lambda: ImageFiles(self.paths, self.image_labels, self.image_size, self.mean, self.std)
        )
