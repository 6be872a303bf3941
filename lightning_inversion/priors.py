"""Image priors: penalties on the dummy images added to the matching cost, each with its own weight.

A prior is chosen in YAML by ``class_path`` and the attack holds a list of them. Shapes follow the attack's batch
axes: dummy images come as ``(..., B, C, H, W)`` with any leading axes (restarts, targets) and a prior returns one
value per leading index, ``(...)``, in fp32. Nothing here imports Lightning.

Some priors need more than the pixels. A prior names what it needs in :attr:`ImagePrior.needs`, and the client's
functional pass (the same pass that computes the dummy update) hands it over in ``seen``, so no prior runs the
victim a second time. What can be asked for:

- ``"batchnorm_statistics"``: for every BatchNorm layer of the victim, keyed by its name in
  ``victim.named_modules()``, the per-channel ``(mean, var)`` of that layer's *input* over the client's batch
  (batch and spatial axes; ``var`` biased, i.e. divided by n), taken in the client's first forward pass on the
  dummy images; each ``(..., C)`` with the images' leading axes.
"""

from __future__ import annotations

from typing import Any

from jsonargparse.typing import NonNegativeFloat
from torch import Tensor, nn

from .client import BATCHNORM_STATISTICS, Update  # noqa: F401 - the name priors ask for, defined beside the pass


class ImagePrior:
    """A penalty on the dummy images, weighted.

    Subclasses implement :meth:`penalty` and, when they need what the client's forward pass saw, list it in
    :attr:`needs`. :meth:`prepare` is called once per target before the first step, with the victim and the
    target update (e.g. to read reference statistics).

    Args:
        weight: the prior's weight in the loss (0 switches it off).
    """

    needs: frozenset[str] = frozenset()

    def __init__(self, weight: NonNegativeFloat = 1.0) -> None:
        weight = float(weight)
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"a prior's weight must be a finite number >= 0, got {weight!r}")
        self.weight = weight

    def prepare(self, victim: nn.Module, update: Update) -> None:
        """Read what the prior needs from the victim and the target update (nothing by default)."""

    def penalty(self, images: Tensor, seen: dict[str, Any]) -> Tensor:
        """The unweighted penalty of ``(..., B, C, H, W)`` images, ``(...)``."""
        raise NotImplementedError

    def __call__(self, images: Tensor, seen: dict[str, Any] | None = None) -> Tensor:
        return self.weight * self.penalty(images, seen or {})


class StatisticsSource:
    """Where reference BatchNorm statistics come from, for priors that match them.

    :meth:`statistics` returns, for BatchNorm layers of the victim keyed by their name in
    ``victim.named_modules()``, the per-channel reference ``(mean, var)`` (``var`` biased), each ``(C,)``.
    """

    def statistics(self, victim: nn.Module, update: Update) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError


def total_variation(images: Tensor) -> Tensor:
    """Anisotropic total variation of ``(..., B, C, H, W)`` images, ``(...)``.

    ``mean|x[..., :, 1:] − x[..., :, :-1]| + mean|x[..., 1:, :] − x[..., :-1, :]|``, each mean over the B, C, H and W
    axes of one leading index.
    """
    if images.dim() < 4:
        raise ValueError(f"images must be (..., B, C, H, W), got shape {tuple(images.shape)}")
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs()
    return dx.mean(dim=(-4, -3, -2, -1)) + dy.mean(dim=(-4, -3, -2, -1))


class TotalVariation(ImagePrior):
    """Total variation (Rudin, Osher, Fatemi), the image prior of Geiping et al. 2020: see :func:`total_variation`.

    Args:
        weight: the prior's weight in the loss (about 1e-2 for CIFAR in the paper; 0 switches it off).
    """

    def penalty(self, images: Tensor, seen: dict[str, Any]) -> Tensor:
        return total_variation(images.float())

    def __repr__(self) -> str:
        return f"TotalVariation(weight={self.weight})"
