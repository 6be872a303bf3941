"""Real photos shipped inside scikit-image: attack targets (and a training set) that work fully offline."""

from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError
from ..images import IMAGENET_MEAN, IMAGENET_STD, normalize
from .base import VisionData, check_whole

# Colour photos scikit-image loads without the network.
PhotoName = Literal[
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
]
PHOTO_NAMES: tuple[str, ...] = get_args(PhotoName)


@functools.cache
def _photo_array(name: str) -> np.ndarray:
    import skimage.data

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle returns (left, right, disparity)
        array = array[0]
    array = np.ascontiguousarray(array)
    array.flags.writeable = False  # shared by every caller
    return array


def load_photo(name: str) -> Tensor:
    """One of scikit-image's shipped photos as a float tensor ``(3, H, W)`` in [0, 1]."""
    if name not in PHOTO_NAMES:
        raise InputError(f"unknown photo {name!r}; the offline photos are {', '.join(PHOTO_NAMES)}")
    return torch.tensor(_photo_array(name)).permute(2, 0, 1).float() / 255


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``(C, H, W)`` to ``size`` (antialiased bilinear), clamped to [0, 1]."""
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[
        0
    ].clamp(0, 1)


def center_square(image: Tensor, size: int) -> Tensor:
    """Crop the central square of ``(C, H, W)`` and resize it to ``size × size`` (antialiased)."""
    _, h, w = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return resize(image[:, top : top + s, left : left + s], (size, size))


@functools.lru_cache(maxsize=32)
def _photo_at(name: str, short_side: int) -> Tensor:
    """A photo resized so its short side is at most ``short_side``: the source for cheap random crops."""
    photo = load_photo(name)
    _, h, w = photo.shape
    scale = short_side / min(h, w)
    if scale >= 1:
        return photo
    return resize(photo, (round(h * scale), round(w * scale)))


class _PhotoTargets(Dataset):
    def __init__(self, names: tuple[str, ...], size: int, mean, std) -> None:
        self.names, self.size, self.mean, self.std = names, size, mean, std
        self.targets = list(range(len(names)))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = center_square(load_photo(self.names[i]), self.size)
        return normalize(image, self.mean, self.std), i


class PhotoCrops(Dataset):
    """Random square crops of photos, labelled by their photo; item ``i`` is the same crop on every call.

    Each crop is a square whose side is a random fraction (``scale``) of the photo's short side, at a random
    position inside a vertical band of the photo, resized to ``size`` and flipped with probability 1/2. The
    parameters come from a generator seeded with ``(seed, i)``, so any worker produces the same crop for the
    same index, and nothing is stored but the source photos.

    Args:
        photos: the source photos ``(3, H, W)`` in [0, 1]; item ``i`` is cropped from photo ``i % len(photos)``.
        length: the number of crops.
        size: the side of the square crops.
        band: the horizontal band ``(start, stop)`` crops are taken from, as fractions of the width.
        scale: the range of the crop side, as fractions of the photo's short side.
        seed: seeds every crop (with its index).
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """

    def __init__(
        self,
        photos: list[Tensor],
        length: int,
        size: int,
        band: tuple[float, float],
        scale: tuple[float, float],
        seed: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.photos, self.length, self.size = photos, length, size
        self.band, self.scale, self.seed, self.mean, self.std = band, scale, seed, mean, std

    @property
    def targets(self) -> list[int]:
        return [i % len(self.photos) for i in range(self.length)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(f"crop {i} out of range for {self.length} crops")
        label = i % len(self.photos)
        photo = self.photos[label]
        _, h, w = photo.shape
        left_edge, right_edge = math.floor(self.band[0] * w), math.floor(self.band[1] * w)
        rng = np.random.default_rng([self.seed, i])
        side = round(rng.uniform(*self.scale) * min(h, w))
        side = max(1, min(side, h, right_edge - left_edge))  # a narrow band caps the crop
        top = int(rng.integers(0, h - side + 1))
        left = left_edge + int(rng.integers(0, right_edge - left_edge - side + 1))
        crop = resize(
            photo[:, top : top + side, left : left + side], (self.size, self.size)
        )  # (3, size, size)
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        return normalize(crop, self.mean, self.std), label


class PhotoData(VisionData):
    """scikit-image's eight colour photos, one class each, as private images: no download, ever.

    The attack targets are the whole photos (centre square). For training a victim offline, the training
    split is ``train_size`` random crops of the left ``1 - val_fraction`` of each photo and the validation
    split ``val_size`` crops of the right ``val_fraction``, so validation never sees training pixels.

    Args:
        image_size: the side the photos and crops are resized to.
        photos: which photos form the classes (default: all eight).
        train_size: the number of training crops (one epoch).
        val_size: the number of validation crops.
        crop_scale: the range of the crop side, as fractions of the photo's short side.
        val_fraction: the width fraction at the right of each photo that only validation crops come from.
        seed: seeds the crops (validation uses ``seed + 1``).
        **kwargs: see :class:`VisionData`.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(
        self,
        image_size: PositiveInt = 32,
        photos: list[PhotoName] | None = None,
        train_size: PositiveInt = 20000,
        val_size: PositiveInt = 2000,
        crop_scale: tuple[float, float] = (0.1, 0.4),
        val_fraction: float = 0.25,
        seed: NonNegativeInt = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.photos = tuple(photos) if photos else PHOTO_NAMES
        unknown = [p for p in self.photos if p not in PHOTO_NAMES]
        if unknown:
            raise InputError(f"unknown photos {unknown}; choose from {', '.join(PHOTO_NAMES)}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise InputError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if not 0 < val_fraction < 1:
            raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        for name, value, low in (("image_size", image_size, 1), ("train_size", train_size, 1)):
            check_whole(name, value, low)
        check_whole("val_size", val_size, 1)
        check_whole("seed", seed, 0)
        self.image_size = int(image_size)
        self.num_classes = len(self.photos)
        self.image_shape = (3, self.image_size, self.image_size)
        self.train_size, self.val_size = int(train_size), int(val_size)
        self.crop_scale, self.val_fraction, self.seed = tuple(crop_scale), float(val_fraction), int(seed)

    def _crops(self, length: int, band: tuple[float, float], seed: int) -> PhotoCrops:
        # Short side >= 4 image sides keeps the smallest crops sharp without resizing full-size photos per item.
        photos = [_photo_at(name, max(256, 4 * self.image_size)) for name in self.photos]
        return PhotoCrops(photos, length, self.image_size, band, self.crop_scale, seed, self.mean, self.std)

    def train_set(self) -> Dataset:
        band = (0.0, 1 - self.val_fraction)
        return self._cached("train", lambda: self._crops(self.train_size, band, self.seed))

    def val_set(self) -> Dataset:
        band = (1 - self.val_fraction, 1.0)
        return self._cached("val", lambda: self._crops(self.val_size, band, self.seed + 1))

    def target_set(self) -> Dataset:
        return self._cached(
            "target", lambda: _PhotoTargets(self.photos, self.image_size, self.mean, self.std)
        )
