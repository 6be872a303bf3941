"""Real photos shipped inside scikit-image: attack targets (and a training set) that work fully offline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..images import IMAGENET_MEAN, IMAGENET_STD, normalize
from .base import VisionData

# Colour photos scikit-image loads without the network (REFERENCE §9).
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)


def load_photo(name: str) -> Tensor:
    """One of scikit-image's shipped photos as a float tensor ``(3, H, W)`` in [0, 1]."""
    import skimage.data

    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; the offline photos are {', '.join(PHOTO_NAMES)}")
    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle returns (left, right, disparity)
        array = array[0]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255


def center_square(image: Tensor, size: int) -> Tensor:
    """Crop the central square of ``(C, H, W)`` and resize it to ``size × size`` (antialiased)."""
    _, h, w = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[:, top : top + s, left : left + s]
    return F.interpolate(square[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[
        0
    ].clamp(0, 1)


class _PhotoTargets(Dataset):
    def __init__(self, names: tuple[str, ...], size: int, mean, std) -> None:
        self.names, self.size, self.mean, self.std = names, size, mean, std

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = center_square(load_photo(self.names[i]), self.size)
        return normalize(image, self.mean, self.std), i


class PhotoData(VisionData):
    """scikit-image's eight colour photos, one class each, as private images: no download, ever.

    Args:
        image_size: the side the photos are resized to (centre square crop).
        photos: which photos form the classes (default: all eight).
        **kwargs: see :class:`VisionData`.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, image_size: int = 32, photos: list[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.photos = tuple(photos) if photos else PHOTO_NAMES
        unknown = [p for p in self.photos if p not in PHOTO_NAMES]
        if unknown:
            raise ValueError(f"unknown photos {unknown}; choose from {', '.join(PHOTO_NAMES)}")
        self.image_size = image_size
        self.num_classes = len(self.photos)
        self.image_shape = (3, image_size, image_size)

    def target_set(self) -> Dataset:
        return _PhotoTargets(self.photos, self.image_size, self.mean, self.std)
