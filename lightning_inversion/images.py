"""Image normalisation, the box constraint and small image filters (no Lightning here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Each dataset's own constants (Geiping et al. 2020's code used CIFAR-10's for ImageNet, a bug we avoid).
CIFAR10_MEAN = (0.4914672, 0.4822617, 0.4467701)
CIFAR10_STD = (0.2470322, 0.2434851, 0.2615879)
CIFAR100_MEAN = (0.5071598, 0.4866936, 0.4412019)
CIFAR100_STD = (0.2673343, 0.2564385, 0.2761505)
MNIST_MEAN = (0.1306637,)
MNIST_STD = (0.3081078,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _channel_view(values: Sequence[float], like: Tensor) -> Tensor:
    """Shape per-channel constants (C,) as (C, 1, 1) on ``like``'s device and dtype."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Map images in [0, 1] to the victim's normalised input space. Works on any ``(..., C, H, W)``."""
    return (images - _channel_view(mean, images)) / _channel_view(std, images)


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Inverse of :func:`normalize`: normalised ``(..., C, H, W)`` back to pixel values (not clamped)."""
    return images * _channel_view(std, images) + _channel_view(mean, images)


def box_bounds(mean: Sequence[float], std: Sequence[float], like: Tensor) -> tuple[Tensor, Tensor]:
    """The image range [0, 1] in normalised coordinates, per channel: ``((0 - m) / s, (1 - m) / s)``."""
    m, s = _channel_view(mean, like), _channel_view(std, like)
    return (0 - m) / s, (1 - m) / s


def project_box(images: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Clamp normalised images ``(..., C, H, W)`` into the per-channel box ``[low, high]``."""
    return torch.maximum(torch.minimum(images, high), low)


def median_filter3x3(images: Tensor) -> Tensor:
    """A 3×3 median filter with reflected borders, per channel, for any ``(..., H, W)``."""
    shape = images.shape
    flat = images.reshape(-1, 1, *shape[-2:])  # (N, 1, H, W)
    padded = F.pad(flat, (1, 1, 1, 1), mode="reflect")
    patches = padded.unfold(2, 3, 1).unfold(3, 3, 1)  # (N, 1, H, W, 3, 3)
    return patches.reshape(*patches.shape[:4], 9).median(dim=-1).values.reshape(shape)
