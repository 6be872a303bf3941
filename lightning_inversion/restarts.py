"""The restart bank: R independent trials of the attack, their start, their scores and the choice among them.

Restarts are a leading batch axis of the dummy images, ``(R, B, C, H, W)``. Restart r starts from images drawn with
seed ``seed + r``, as R separate runs with seeds seed, seed+1, … do. Under several processes each optimises a slice
of the restarts (:func:`local_restarts`). At the end, without ground truth, a :class:`RestartSelection` scores the
restarts and chooses (or combines) the result, a :class:`Reconstruction`. With several targets the slots are
``(target, restart)`` pairs, target-major (slot ``t·R + r``): each slot is matched against its own target's update
(:func:`slot_costs`) and each target's restarts are chosen among themselves (:func:`target_reconstructions`).
Nothing here imports Lightning.

Under several processes (DDP, any number of nodes) every process holds all slots but puts only its slice
(:func:`local_restarts`) into the loss, scaled by the world size, so DDP's gradient average hands each slice the
gradient of the one process that computed it and the restarts stay independent; the scores are summed over the
processes and the best restart is chosen over all of them. Each process runs the victim on its slice at once, which
rounds differently from one process running all of them (see below): the images equal a one-device run's over the
first steps and drift apart after that, with the same quality in distribution.

Batched restarts: restart r starts from the images of a separate run with seed ``seed + r`` and follows the same
update rule, but the victim's passes over R restarts at once (``torch.func.vmap``) round differently from passes
over one (the dummy update differs by about one unit in the last place). The sign step hides this until a gradient
entry close to zero takes the other sign; from there the two trajectories drift apart. Measured on a small
ConvNet (16×16 image, 4 restarts, CPU): bit-identical images at 20 steps, at most 4e-4 apart in pixel value at 100
steps, up to 0.2 at 300 steps, with each restart's PSNR within 0.3 dB of its separate run's. So batched restarts
equal separate runs over the first steps and give the same quality in distribution, not the same images, after.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .client import Client, _has_batchnorm
from .images import denormalize
from .objectives import GradientMatching, TargetStack
from .priors import ImagePrior, prior_sum, total_variation

log = logging.getLogger(__name__)

Init = Literal["randn", "rand", "zeros", "analytic"]

#: How each ``init`` draws one restart's images of a given shape (``analytic`` starts from ``randn`` and is
#: replaced by the closed-form recovery once the target is known).
INITIALISERS: dict[str, Callable[[tuple[int, ...], torch.Generator], Tensor]] = {
    "randn": lambda shape, gen: torch.randn(shape, generator=gen),
    "rand": lambda shape, gen: torch.rand(shape, generator=gen) * 2 - 1,
    "zeros": lambda shape, gen: torch.zeros(shape),
    "analytic": lambda shape, gen: torch.randn(shape, generator=gen),
}


def initial_restarts(
    restarts: int,
    seed: int,
    init: Init,
    image_shape: tuple[int, ...],
    soft_labels: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The initial dummy images ``(R, *image_shape)`` and, for DLG, soft-label logits ``(R, B, K)``.

    Restart r draws its images (then its soft labels) from a generator seeded ``seed + r``.

    Args:
        restarts: R.
        seed: the seed of restart 0.
        init: ``randn``, ``rand`` (uniform in [−1, 1]), ``zeros`` or ``analytic`` (``randn`` until replaced).
        image_shape: one restart's images, ``(B, C, H, W)``.
        soft_labels: ``(B, K)`` to draw soft-label logits too.
    """
    images, labels = [], []
    for r in range(restarts):
        gen = torch.Generator().manual_seed(seed + r)
        images.append(INITIALISERS[init](tuple(image_shape), gen))
        if soft_labels is not None:
            labels.append(torch.randn(soft_labels, generator=gen))
    return torch.stack(images), torch.stack(labels) if soft_labels is not None else None


def batched_client_pass(
    client: Client,
    victim: nn.Module,
    images: Tensor,
    labels: Tensor,
    only: list[int] | None = None,
    needs: list[str] | tuple[str, ...] = (),
) -> tuple[list[Tensor], dict]:
    """The client's update for each restart's dummy images, and what its first forward pass saw for the priors.

    Restarts run at once under ``torch.func.vmap`` (one restart without it); in training mode each restart gets its
    own copy of the victim's buffers (BatchNorm updates them in place).

    Args:
        client: the client's protocol.
        victim: the victim (its parameters and buffers are used).
        images: ``(r, B, C, H, W)`` dummy images.
        labels: ``(B,)`` hard labels shared by all, ``(r, B)`` hard labels each, or ``(r, B, K)`` soft-label logits.
        only: the indices of the compared parameters (all if ``None``).
        needs: what the priors ask of the pass (see :mod:`lightning_inversion.priors`); nothing is recorded, at no
            cost, when empty.

    Returns:
        one ``(r, *shape)`` tensor per compared victim parameter; ``seen`` (empty unless ``needs``) with the
        leading ``r`` axis.
    """
    params, buffers = dict(victim.named_parameters()), dict(victim.named_buffers())
    per_slot, train_mode, r = labels.dim() >= 2, client.train_mode, images.shape[0]

    def one(x: Tensor, y: Tensor, b: dict[str, Tensor]) -> tuple[tuple[Tensor, ...], dict]:
        seen = {k: {} for k in needs} if needs else None
        update = client.simulate(victim, params, b, x, y, only=only, seen=seen)
        return tuple(update), seen or {}

    if r == 1:  # a single restart does not pay for batching
        b = {k: v.clone() for k, v in buffers.items()} if train_mode else buffers
        update, seen = tree_map(
            lambda t: t.unsqueeze(0), one(images[0], labels[0] if per_slot else labels, b)
        )
        return list(update), seen
    cpu_autocast = images.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if train_mode and cpu_autocast and _has_batchnorm(victim):
        # PyTorch's vmap rule for batch norm rejects bf16 inputs with fp32 weights on the CPU: there, and only
        # there, restarts run one after another. (In eval mode the client writes batch norm out as an affine
        # map, see client.EvalBatchNormAsAffine, and vmap takes it.)
        passes = [
            batched_client_pass(
                client, victim, images[i : i + 1], labels[i : i + 1] if per_slot else labels, only, needs
            )
            for i in range(r)
        ]
        joined = tree_map(lambda *ts: torch.cat(ts), *passes)
        return list(joined[0]), joined[1]
    if train_mode:  # BatchNorm updates its statistics in place: give each restart its own copy
        buffers = {k: v.expand(r, *v.shape).clone() for k, v in buffers.items()}
    in_dims = (0, 0 if per_slot else None, 0 if train_mode else None)
    update, seen = torch.func.vmap(one, in_dims=in_dims, randomness="different")(images, labels, buffers)
    return list(update), seen


def local_restarts(restarts: int, world: int, rank: int) -> Tensor:
    """The restarts process ``rank`` of ``world`` optimises: contiguous slices, as even as possible."""
    return torch.arange(restarts).tensor_split(world)[rank]


def slot_labels(idx: Tensor, target_labels: Tensor, dummy_labels: Tensor | None, restarts: int) -> Tensor:
    """The labels of some slots ``idx``: their soft-label logits ``(r, B, K)`` when the labels are optimised, else
    the hard labels, ``(B,)`` shared by the restarts of one target, or from ``(T, B)`` each slot's target's
    ``(r, B)``."""
    if dummy_labels is not None:
        return dummy_labels[idx]
    if target_labels.dim() == 1:
        return target_labels
    return target_labels[idx.to(target_labels.device) // restarts]


def split_tree(tree, sizes: list[int]) -> list:
    """A tree (tensors in nested tuples, lists and dicts) with a leading axis, split into ``len(sizes)`` trees
    along it, the i-th with ``sizes[i]`` rows of every tensor."""
    if isinstance(tree, Tensor):
        return list(tree.split(sizes))
    if isinstance(tree, tuple | list):
        return [type(tree)(parts) for parts in zip(*(split_tree(t, sizes) for t in tree), strict=True)]
    if isinstance(tree, dict):
        keys, values = list(tree), [split_tree(v, sizes) for v in tree.values()]
        return (
            [dict(zip(keys, parts, strict=True)) for parts in zip(*values, strict=True)]
            if keys
            else [{} for _ in sizes]
        )
    raise TypeError(f"cannot split {type(tree).__name__}")


def slot_costs(
    matchings: list[GradientMatching] | TargetStack,
    priors: list[ImagePrior],
    restarts: int,
    dummy: list[Tensor],
    images: Tensor,
    seen: dict,
    slots: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Each slot's matching cost against its own target's update, and its priors' weighted sum, both ``(r,)``.

    Args:
        matchings: the objective bound to each target's update (one for one target), or all of them at once
            (:class:`~.objectives.TargetStack`, the faster).
        priors: the image priors.
        restarts: R, the restarts of each target.
        dummy: the dummy update of the slots, one ``(r, *shape)`` tensor per compared victim parameter.
        images: the slots' dummy images ``(r, B, C, H, W)``.
        seen: what the client's pass saw for the priors, with the leading ``r`` axis.
        slots: the slots of ``images`` (on the CPU, ascending; all when ``None``); with several targets each
            target's slots get its objective, and priors over its restarts only.
    """
    if not isinstance(matchings, TargetStack) and len(matchings) == 1:
        return matchings[0](dummy), prior_sum(priors, images, seen)
    owners = (torch.arange(len(images)) if slots is None else slots) // restarts
    targets, counts = torch.unique_consecutive(owners, return_counts=True)
    split = counts.tolist()
    if isinstance(
        matchings, TargetStack
    ):  # the matching in one batch; the priors over each target's restarts
        penalties = [
            prior_sum(priors, x, s) for x, s in zip(images.split(split), split_tree(seen, split), strict=True)
        ]
        return matchings(dummy, owners), torch.cat(penalties)
    parts = zip(
        targets.tolist(),
        zip(*(g.split(split) for g in dummy), strict=True),
        images.split(split),
        split_tree(seen, split),
        strict=True,
    )
    costs, penalties = zip(
        *[(matchings[t](list(d)), prior_sum(priors, x, s)) for t, d, x, s in parts], strict=True
    )
    return torch.cat(costs), torch.cat(penalties)


def as_pixels(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Dummy images of the victim's normalised input space as pixels: de-normalised, clamped to [0, 1], fp32."""
    return denormalize(images.detach().float(), mean, std).clamp(0, 1)


class RestartSelection:
    """How the final images are chosen from the restarts without ground truth (lower scores are better).

    Subclasses say what a restart's score is (:attr:`score`: its ``matching`` cost, without priors, or its total
    variation ``tv``) and how the valid restarts become one result (:meth:`combine`). A restart whose score is NaN,
    or that never ran, never counts.
    """

    name = ""
    score: Literal["matching", "tv"] = "matching"

    def combine(self, restarts: Tensor, scores: Tensor) -> tuple[Tensor, int | None]:
        """The images from ``(R, ...)`` restarts and their ``(R,)`` scores (+inf: not valid, at least one valid);
        and the chosen restart, or ``None`` when the images combine several."""
        chosen = int(scores.argmin())
        return restarts[chosen], chosen

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LowestMatching(RestartSelection):
    """The restart with the lowest matching cost. Short name ``matching``."""

    name = "matching"


class LowestTotalVariation(RestartSelection):
    """The restart with the lowest total variation. Short name ``tv``."""

    name = "tv"
    score = "tv"


class PixelMean(RestartSelection):
    """The per-pixel mean over the valid restarts. Short name ``mean``."""

    name = "mean"

    def combine(self, restarts: Tensor, scores: Tensor) -> tuple[Tensor, int | None]:
        return restarts[torch.isfinite(scores)].mean(0), None


class PixelMedian(RestartSelection):
    """The per-pixel median over the valid restarts. Short name ``median``."""

    name = "median"

    def combine(self, restarts: Tensor, scores: Tensor) -> tuple[Tensor, int | None]:
        return restarts[torch.isfinite(scores)].median(0).values, None


#: The short names of the selections, as configs give them (``restart_selection: median``).
SELECTIONS: dict[str, type[RestartSelection]] = {
    cls.name: cls for cls in (LowestMatching, LowestTotalVariation, PixelMean, PixelMedian)
}


@torch.no_grad()
def restart_scores(
    selection: RestartSelection,
    images: Tensor,
    local: Tensor,
    matching: Callable[[Tensor], Tensor],
) -> Tensor:
    """This process's restarts' scores in an ``(R,)`` tensor of zeros elsewhere (to be summed over processes).

    Args:
        selection: what a score is.
        images: every restart's dummy images ``(R, B, C, H, W)``.
        local: the restarts this process scores.
        matching: the matching cost of some restarts' images, ``(r, ...) -> (r,)``.
    """
    scores = torch.zeros(images.shape[0], device=images.device)
    idx = local.to(images.device)
    if len(idx):
        if selection.score == "tv":
            scores[idx] = total_variation(images[idx].float())
        else:
            with torch.enable_grad():
                scores[idx] = matching(images[idx]).detach().float()
    return scores


def valid_scores(scores: Tensor, steps: Tensor, exact: bool = False) -> Tensor:
    """``scores`` with +inf for a restart whose score is not finite or that never ran (unless ``exact``: a
    closed-form result needs no step)."""
    ran = (steps.to(scores.device) > 0) | exact
    return torch.where(torch.isfinite(scores) & ran, scores, torch.full_like(scores, math.inf))


@dataclass
class Reconstruction:
    """The outcome of an attack.

    Attributes:
        images: the chosen (or combined) reconstruction, de-normalised and clamped to [0, 1], ``(B, C, H, W)``.
        labels: the labels the attack used or recovered, ``(B,)``.
        restarts: every restart, de-normalised and clamped to [0, 1], ``(R, B, C, H, W)``.
        scores: each restart's selection score (lower is better; +inf: never valid).
        chosen_restart: the restart chosen, ``None`` when the images combine several or none was valid.
        restart_selection: the selection's short name.
        labels_from: the label strategy that applied (``given``, ``idlg``, ``batch``, ``dlg``).
        restart_steps: the optimisation steps each restart ran.
        steps: the most steps any restart ran.
        seconds: the attack's wall time (without set-up).
        metrics: the report's measurements against ground truth, when it was known.
        threat_model: what the attacker assumed (:func:`~lightning_inversion.threat_model.threat_model`).
    """

    images: Tensor
    labels: Tensor
    restarts: Tensor
    scores: list[float]
    chosen_restart: int | None
    restart_selection: str
    labels_from: str
    restart_steps: list[int]
    steps: int
    seconds: float
    metrics: dict | None = None
    threat_model: dict | None = None

    def stats(self) -> dict:
        """The scalar fields as plain values (for ``reconstruction.pt`` and ``metrics.json``)."""
        return {
            "scores": self.scores,
            "chosen_restart": self.chosen_restart,
            "restart_selection": self.restart_selection,
            "labels_from": self.labels_from,
            "restart_steps": self.restart_steps,
            "steps": self.steps,
            "seconds": self.seconds,
            "threat_model": self.threat_model,
        }


def choose(
    selection: RestartSelection,
    restarts: Tensor,
    scores: Tensor,
) -> tuple[Tensor, int | None]:
    """The images chosen from ``restarts`` (``(R, ...)``) by ``selection``; NaN images when no score is finite."""
    if not bool(torch.isfinite(scores).any()):
        log.error("no restart has a finite score (all NaN or never run): no reconstruction is chosen")
        return torch.full_like(restarts[0], math.nan), None
    return selection.combine(restarts, scores)


def reconstruction(
    selection: RestartSelection,
    restarts: Tensor,
    scores: Tensor,
    steps: Tensor,
    labels: Tensor,
    labels_from: str,
    seconds: float,
) -> Reconstruction:
    """The :class:`Reconstruction` chosen from the restarts.

    Args:
        selection: how the images are chosen.
        restarts: every restart's images in [0, 1], ``(R, B, C, H, W)``.
        scores: their scores from :func:`valid_scores`, ``(R,)``.
        steps: the steps each restart ran, ``(R,)``.
        labels: the hard labels ``(B,)``, or soft-label logits ``(R, B, K)`` (those of the chosen restart, or of
            restart 0 when several combine, give the labels).
        labels_from: the label strategy that applied.
        seconds: the attack's wall time.
    """
    images, chosen = choose(selection, restarts, scores)
    if labels.dim() == 3:
        labels = labels[chosen if chosen is not None else 0].argmax(-1)
    per_restart = [int(s) for s in steps.cpu()]
    return Reconstruction(
        images=images.cpu(),
        labels=labels.clone().cpu(),
        restarts=restarts.cpu(),
        scores=[float(s) for s in scores.cpu()],
        chosen_restart=chosen,
        restart_selection=selection.name or type(selection).__name__,
        labels_from=labels_from,
        restart_steps=per_restart,
        steps=max(per_restart, default=0),
        seconds=round(seconds, 3),
    )


def target_reconstructions(
    selection: RestartSelection,
    pixels: Tensor,
    scores: Tensor,
    steps: Tensor,
    labels: Tensor,
    labels_from: list[str],
    seconds: float,
    threat_models: list[dict] | None = None,
) -> list[Reconstruction]:
    """One :class:`Reconstruction` per target, each chosen among that target's own restarts.

    Args:
        selection: how the images are chosen.
        pixels: every slot's images in [0, 1], ``(T·R, B, C, H, W)``, target-major.
        scores: the slots' scores from :func:`valid_scores`, ``(T·R,)``.
        steps: the steps each slot ran, ``(T·R,)``.
        labels: the hard labels, ``(B,)`` for one target or ``(T, B)``, or the slots' soft-label logits
            ``(T·R, B, K)``.
        labels_from: the label strategy that applied to each target (T names).
        seconds: the attack's wall time.
        threat_models: what the attack assumed of each target.
    """
    targets = len(labels_from)
    r = len(pixels) // targets
    results = []
    for t in range(targets):
        own = slice(t * r, (t + 1) * r)
        own_labels = labels[own] if labels.dim() == 3 else labels if labels.dim() == 1 else labels[t]
        result = reconstruction(
            selection, pixels[own], scores[own], steps[own], own_labels, labels_from[t], seconds
        )
        result.threat_model = threat_models[t] if threat_models is not None else None
        results.append(result)
    return results
