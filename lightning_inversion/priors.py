"""Image priors: penalties on the dummy images added to the matching cost, each with its own weight.

A prior is chosen in YAML by ``class_path`` and the attack holds a list of them. Shapes follow the attack's batch
axes: dummy images come as ``(..., B, C, H, W)`` with any leading axes (restarts, targets) and a prior returns one
value per leading index, ``(...)``, in fp32. Nothing here imports Lightning.

Some priors need more than the pixels. A prior names what it needs in :attr:`ImagePrior.needs`, and the client's
functional pass (the same pass that computes the dummy update) hands it over in ``seen``, so no prior runs the
victim a second time. What can be asked for:

- ``"batchnorm_statistics"``: for every BatchNorm layer of the victim, keyed by its name in
  ``victim.named_modules()``, the per-channel ``(mean, var)`` of that layer's *input* over the client's batch
  (batch and spatial axes; ``var`` biased, i.e. divided by n), taken in the client's forward pass on the
  dummy images; each ``(..., C)`` with the images' leading axes. Over several local steps (FedAvg), each step's
  batch statistics averaged with the weights the layer's running statistics give them, as the buffers absorb
  them.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat
from torch import Tensor, nn

from .client import BATCHNORM_STATISTICS, Update  # noqa: F401 - the name priors ask for, defined beside the pass
from .errors import InputError

log = logging.getLogger(__name__)


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

    def at_step(self, step: int, max_steps: int) -> None:
        """Called before each optimisation step ``step`` of ``max_steps`` (for weight schedules; nothing by
        default)."""

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


def attack_priors(tv: float, priors: list[ImagePrior] | None) -> list[ImagePrior]:
    """The attack's priors: a :class:`TotalVariation` of weight ``tv`` first (none if 0), then ``priors``.

    Raises:
        InputError: total variation given twice (``tv`` > 0 and a ``TotalVariation`` in ``priors``).
    """
    priors = list(priors or [])
    if tv > 0 and any(isinstance(p, TotalVariation) for p in priors):
        raise InputError("total variation is given twice: set tv 0 or drop the TotalVariation prior")
    return ([TotalVariation(tv)] if tv > 0 else []) + priors


def prepare_priors(priors: list[ImagePrior], victim: nn.Module, update: Update, targets: int = 1) -> None:
    """Prepare each prior (:meth:`ImagePrior.prepare`) with the victim and the (first) target update.

    Raises:
        InputError: with several targets, a prior that reads the target update (it would read the first only).
    """
    for prior in priors:
        if targets > 1 and type(prior).prepare is not ImagePrior.prepare:
            raise InputError(f"the prior {type(prior).__name__} reads the target update: use targets 1")
        prior.prepare(victim, update)


def prior_sum(priors: list[ImagePrior], images: Tensor, seen: dict[str, Any]) -> Tensor:
    """The weighted sum of ``priors`` over ``(r, B, C, H, W)`` images, ``(r,)`` (zeros without priors)."""
    return sum((p(images, seen) for p in priors), torch.zeros(len(images), device=images.device))


def _batchnorm_layers(victim: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in victim.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class RunningStatistics(StatisticsSource):
    """The victim's running BatchNorm statistics: the statistics of the data it was trained on.

    What Yin et al. (GradInversion, CVPR 2021) and DeepInversion match. PyTorch keeps ``running_var`` as an
    average of *unbiased* batch variances; over the thousands of entries a channel has per batch (batch and
    spatial axes) the factor ``n / (n − 1)`` is far below the statistics' own spread, so it is used as it is.
    A victim that never trained holds BatchNorm's initial values (mean 0, variance 1), which say nothing about
    any data: a warning says so. The threat model of a number made with this source reads
    ``batchnorm_statistics: running``.

    Raises:
        InputError: (from :meth:`statistics`) the victim has no BatchNorm layer with running statistics.
    """

    assumption = "running"

    def statistics(self, victim: nn.Module, update: Update) -> dict[str, tuple[Tensor, Tensor]]:
        found = {
            name: (m.running_mean.detach().float(), m.running_var.detach().float())
            for name, m in _batchnorm_layers(victim)
            if m.running_mean is not None and m.running_var is not None
        }
        if not found:
            raise InputError(
                f"the victim {type(victim).__name__} has no BatchNorm layer with running statistics: the "
                "BatchNorm-statistics prior (reference RunningStatistics) has nothing to match; drop the prior"
            )
        untouched = [
            name
            for name, m in _batchnorm_layers(victim)
            if name in found and m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0
        ]
        if len(untouched) == len(found):
            log.warning(
                "the victim's BatchNorm layers never tracked a batch (num_batches_tracked 0): their running "
                "statistics are the initial mean 0 and variance 1, not a training set's"
            )
        return found


class BatchNormStatistics(ImagePrior):
    """DeepInversion's feature-distribution prior (Yin et al., CVPR 2020; GradInversion, CVPR 2021).

    For every BatchNorm layer of the victim, the per-channel mean and variance of the layer's input over the
    dummy batch are pulled toward reference statistics. ``distance="l2"`` is the papers' form:

        R_BN(x) = Σ_l w_l (‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂)

    ``distance="kl"`` measures each channel in units of the reference's own spread: the mean over the channels
    of the Kullback–Leibler divergence between Gaussians,

        R_BN(x) = Σ_l w_l mean_c [ ½ log(σ̂²/σ²) + (σ² + (μ − μ̂)²) / (2 σ̂²) − ½ ]     (σ², σ̂² plus 1e-5)

    so a channel with a small reference variance counts as much as one with a large one. That is the scale a
    train-mode client's BatchNorm works in (it divides each channel by the batch's own σ), which makes it the
    form for recovered statistics. With ``w_l = first_layer_weight`` for the victim's first BatchNorm layer and 1
    for the others. The dummy statistics come from the client's own forward pass
    (``seen["batchnorm_statistics"]``), batched over the images' leading axes (restarts, targets); the
    reference from :attr:`reference`, read once per target in :meth:`prepare`.

    Args:
        reference: where the reference statistics come from: :class:`RunningStatistics` (the victim's, i.e. its
            training set's) or the private batch's own, recovered from the update's moved buffers.
        weight: the prior's weight in the loss.
        first_layer_weight: extra weight of the first BatchNorm layer, whose input is closest to the pixels
            (DeepInversion's ``first_bn_multiplier``).
        distance: ``l2`` (the papers' Euclidean distances of the means and of the variances) or ``kl`` (the
            Gaussian Kullback–Leibler divergence per channel, relative to the reference's spread).
    """

    needs = frozenset({BATCHNORM_STATISTICS})
    EPS = 1e-5  # added to both variances under distance "kl" (BatchNorm's own eps)

    def __init__(
        self,
        reference: StatisticsSource,
        weight: NonNegativeFloat = 1e-2,
        first_layer_weight: NonNegativeFloat = 1.0,
        distance: Literal["l2", "kl"] = "l2",
    ) -> None:
        super().__init__(weight)
        if distance not in ("l2", "kl"):
            raise ValueError(f"distance must be 'l2' or 'kl', got {distance!r}")
        self.reference = reference
        self.first_layer_weight = float(first_layer_weight)
        self.distance = distance
        # What prepare() read for the current target; held apart from the options (a checkpoint describes a
        # prior by its plain attributes, which must not change when it is prepared).
        self.prepared: dict[str, Any] = {}

    def prepare(self, victim: nn.Module, update: Update) -> None:
        """Read the reference statistics for this victim and target update.

        Raises:
            InputError: the victim has no BatchNorm layer, or the reference names layers it does not have.
        """
        layers = [name for name, _ in _batchnorm_layers(victim)]
        if not layers:
            raise InputError(
                f"the BatchNorm-statistics prior needs a victim with BatchNorm layers; {type(victim).__name__} "
                "has none: drop the prior"
            )
        targets = self.reference.statistics(victim, update)
        unknown = sorted(set(targets) - set(layers))
        if unknown:
            raise InputError(
                f"the BatchNorm-statistics reference names layers the victim does not have: {', '.join(unknown)}"
            )
        device = next(victim.parameters()).device
        self.prepared = {
            "statistics": {n: (m.to(device).float(), v.to(device).float()) for n, (m, v) in targets.items()},
            "first_layer": layers[0],
        }

    def penalty(self, images: Tensor, seen: dict[str, Any]) -> Tensor:
        if not self.prepared:
            raise RuntimeError("BatchNormStatistics.prepare(victim, update) must run before the penalty")
        statistics = seen.get(BATCHNORM_STATISTICS)
        if statistics is None:
            raise RuntimeError(
                "the client's forward pass did not hand over the BatchNorm statistics this prior needs"
            )
        total = images.new_zeros(images.shape[:-4], dtype=torch.float32)  # (...)
        first_layer = self.prepared["first_layer"]
        for name, (ref_mean, ref_var) in self.prepared["statistics"].items():
            if name not in statistics:
                raise RuntimeError(f"no BatchNorm statistics were seen for layer {name!r}")
            mean, var = statistics[name]  # (..., C) each
            mean, var = mean.float(), var.float()
            if self.distance == "kl":
                var, ref = var + self.EPS, ref_var + self.EPS
                divergence = 0.5 * (ref.log() - var.log()) + (var + (mean - ref_mean) ** 2) / (2 * ref) - 0.5
                distance = divergence.mean(-1)
            else:
                distance = (mean - ref_mean).norm(dim=-1) + (var - ref_var).norm(dim=-1)
            total = total + (self.first_layer_weight if name == first_layer else 1.0) * distance
        return total


class GroupConsistency(ImagePrior):
    """Group consistency (Yin et al., "See through Gradients", CVPR 2021): restarts pulled toward their consensus.

    The consensus is the per-pixel mean of the restarts, the axis −5 of the dummy images ``(..., R, B, C, H, W)``,
    taken as a constant (no gradient flows through it); each restart's penalty is its Euclidean distance to it,
    ``‖x_r − x̄‖₂`` over ``(B, C, H, W)``, divided by ``√(B·C·H·W)`` so the weight does not depend on the image
    size. Yin et al. also register the restarts to each other before averaging; this prior does not (the images
    of one restart are in the order of the labels, so image b of every restart is the same private image as long
    as the labels are told apart).

    The weight follows a schedule over the attack's steps: 0 before ``start`` (a fraction of the steps), then a
    linear ramp over ``ramp`` (a fraction) up to ``weight``. The restarts first find their own way; the pull
    comes once they agree on the coarse picture. :meth:`at_step` sets the progress.

    Under DDP every process holds its own slice of the restarts and the consensus is over that slice: the
    process's own restarts, not all of them. With one restart per process the prior is 0.

    Args:
        weight: the weight at the end of the ramp.
        start: the fraction of the steps before which the prior is off.
        ramp: the fraction of the steps over which the weight rises from 0 to ``weight``.
    """

    def __init__(
        self,
        weight: NonNegativeFloat = 1e-2,
        start: ClosedUnitInterval = 0.25,
        ramp: ClosedUnitInterval = 0.25,
    ) -> None:
        super().__init__(weight)
        self.start, self.ramp = float(start), float(ramp)
        # The fraction of the attack's steps done, set by at_step; held apart from the options (a checkpoint
        # describes a prior by its plain attributes, which must not change from step to step).
        self.schedule = {"progress": 1.0}

    def scale(self, progress: float) -> float:
        """The schedule's factor on the weight at ``progress`` (the fraction of the steps done), in [0, 1]."""
        if progress < self.start:
            return 0.0
        if self.ramp == 0:
            return 1.0
        return min(1.0, (progress - self.start) / self.ramp)

    def at_step(self, step: int, max_steps: int) -> None:
        """Set the schedule's progress before step ``step`` of ``max_steps``."""
        self.schedule["progress"] = step / max_steps if max_steps > 0 else 1.0

    def penalty(self, images: Tensor, seen: dict[str, Any]) -> Tensor:
        if images.dim() < 5:
            raise ValueError(
                f"group consistency needs images (..., R, B, C, H, W) with a restart axis, got {tuple(images.shape)}"
            )
        images = images.float()
        consensus = images.mean(-5, keepdim=True).detach()  # (..., 1, B, C, H, W)
        size = math.prod(images.shape[-4:])
        return (images - consensus).flatten(-4).norm(dim=-1) / math.sqrt(size)  # (..., R)

    def __call__(self, images: Tensor, seen: dict[str, Any] | None = None) -> Tensor:
        return self.scale(self.schedule["progress"]) * super().__call__(images, seen)
