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

from torch import Tensor, nn

from .client import Update

BATCHNORM_STATISTICS = "batchnorm_statistics"


class ImagePrior:
    """A penalty on the dummy images, weighted.

    Subclasses implement :meth:`penalty` and, when they need what the client's forward pass saw, list it in
    :attr:`needs`. :meth:`prepare` is called once per target before the first step, with the victim and the
    target update (e.g. to read reference statistics).

    Args:
        weight: the prior's weight in the loss (0 switches it off).
    """

    needs: frozenset[str] = frozenset()

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = float(weight)

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
