"""Gradient-matching costs of the attack, and the objectives chosen in YAML that use them.

Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients — How easy is it to break privacy in federated
learning?", NeurIPS 2020: one global cosine over the selected gradient tensors plus total variation. The
DLG-lineage costs (``l2``, ``l1``, ``max``, ``simlocal``) are offered beside it. The image priors (total
variation among them) are in :mod:`lightning_inversion.priors`.

Every cost here is batched over a leading *restart* axis: dummy gradients come as ``(R, *shape)`` per tensor and
the cost as ``(R,)``, so restarts never run in a Python loop; :class:`TargetStack` matches each of them with its own
target the same way, so targets do not either. Nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor

from .errors import InputError

Cost = Literal["sim", "l2", "l1", "max", "simlocal"]
LayerSelection = Literal["all", "first", "last", "topk", "list"]
LayerWeighting = Literal["equal", "linear", "exp"]


def select_layers(
    target: Sequence[Tensor],
    selection: LayerSelection = "all",
    k: int | None = None,
    indices: Sequence[int] | None = None,
) -> list[int]:
    """Indices of the target-gradient tensors the cost compares.

    Args:
        target: the target gradient, one tensor per victim parameter.
        selection: ``all``; ``first``/``last`` k tensors; ``topk`` the k tensors of largest target-gradient norm;
            ``list`` an explicit list of indices.
        k: how many tensors for ``first``, ``last`` and ``topk``.
        indices: the tensors for ``list`` (negative indices count from the end).
    """
    n = len(target)
    if selection == "all":
        return list(range(n))
    if selection == "list":
        if not indices:
            raise ValueError("layer selection 'list' needs a non-empty list of indices")
        chosen = sorted({i % n if -n <= i < n else _out_of_range(i, n) for i in indices})
        return chosen
    if k is None or k < 1:
        raise ValueError(f"layer selection {selection!r} needs k >= 1, got {k}")
    k = min(k, n)
    if selection == "first":
        return list(range(k))
    if selection == "last":
        return list(range(n - k, n))
    if selection == "topk":
        norms = torch.stack([t.detach().float().norm() for t in target])
        return sorted(norms.topk(k).indices.tolist())
    raise ValueError(f"unknown layer selection {selection!r}")


def _out_of_range(i: int, n: int) -> int:
    raise ValueError(f"layer index {i} is out of range for a gradient of {n} tensors")


def layer_weights(n: int, weighting: LayerWeighting = "equal") -> list[float]:
    """Weights w_i of the n gradient tensors: equal, linear ``(n - i) / n`` or exponential ``exp(-i)``."""
    if weighting == "equal":
        return [1.0] * n
    if weighting == "linear":
        return [(n - i) / n for i in range(n)]
    if weighting == "exp":
        return [math.exp(-i) for i in range(n)]
    raise ValueError(f"unknown layer weighting {weighting!r}")


def _per_restart_sum(x: Tensor) -> Tensor:
    """Sum over all but the leading restart axis: ``(R, ...) -> (R,)``."""
    return x.reshape(x.shape[0], -1).sum(1)


class _DotsAndSquares(torch.autograd.Function):
    """``⟨gᵢ, g*ᵢ⟩`` and ``‖gᵢ‖²`` per tensor and restart, with a backward of two operations per tensor.

    Left to autograd, ``g * t`` and ``g * g`` are differentiated as three products whose results are then summed
    into g's gradient: five passes over every gradient tensor, and as many kernel launches, per tensor and step.
    The derivative is ``a_r t + 2 b_r g`` (``a``, ``b`` the incoming gradients of the dot and the square): one
    product and one ``addcmul``. For a large victim (ResNet-18: 62 tensors, 11 M entries per restart) that is a
    measurable part of a step. The targets are constants.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(targets: tuple[Tensor, ...], *dummy: Tensor) -> tuple[Tensor, Tensor]:
        dots = torch.stack([_per_restart_sum(g * t) for g, t in zip(dummy, targets, strict=True)])
        # Not torch.linalg.vector_norm: on the CPU in fp32 it is off by 1e-4 relative on ResNet-18's gradient,
        # where a product and a (pairwise) sum stay near 1e-7.
        squares = torch.stack([_per_restart_sum(g * g) for g in dummy])
        return dots, squares

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        targets, *dummy = inputs
        ctx.targets = targets
        ctx.save_for_backward(*dummy)

    @staticmethod
    def backward(ctx, grad_dots: Tensor, grad_squares: Tensor) -> tuple:
        dummy = ctx.saved_tensors
        twice_grad_squares = 2 * grad_squares  # one operation for all tensors, not one each
        grads = []
        for i, (g, t) in enumerate(zip(dummy, ctx.targets, strict=True)):
            per_restart = (g.shape[0],) + (1,) * (g.dim() - 1)
            a = grad_dots[i].reshape(per_restart)
            b = twice_grad_squares[i].reshape(per_restart)
            grads.append(torch.addcmul(g * b, t, a))
        return (None, *grads)


def dots_and_squares(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per tensor and restart: ``⟨gᵢ, g*ᵢ⟩`` and ``‖gᵢ‖²``, both ``(L, R)``.

    Args:
        dummy: one ``(R, *shape)`` tensor per compared parameter.
        target: one ``shape`` tensor per compared parameter, or ``(R, *shape)``, one per restart (a constant: it
            gets no gradient).
    """
    return _DotsAndSquares.apply(tuple(t.detach() for t in target), *dummy)


def matching_cost(
    dummy: Sequence[Tensor],
    target: Sequence[Tensor],
    weights: Sequence[float],
    cost: Cost = "sim",
    target_sq_norms: Sequence[Tensor] | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """The gradient-matching cost of each restart.

    Args:
        dummy: the dummy gradient (or update), one ``(R, *shape)`` tensor per selected victim parameter.
        target: the target gradient, one ``shape`` tensor per selected parameter; or each restart's own,
            ``(R, *shape)`` (see :class:`TargetStack`).
        weights: w_i per selected tensor.
        cost: ``sim`` (1 − one global weighted cosine over all selected tensors), ``l2`` (Σ wᵢ‖gᵢ − g*ᵢ‖²),
            ``l1`` (Σ wᵢ‖gᵢ − g*ᵢ‖₁), ``max`` (Σ wᵢ max|gᵢ − g*ᵢ|), ``simlocal`` (Σ 1 − wᵢ cos(gᵢ, g*ᵢ)).
        target_sq_norms: ‖g*ᵢ‖² per tensor (``(R,)`` each for per-restart targets), when already computed (they
            never change during an attack).
        eps: floor on the cosine's denominators, so a zero dummy gradient gives a finite cost.

    Returns:
        ``(R,)`` costs.
    """
    if len(dummy) != len(target) or len(dummy) != len(weights):
        raise ValueError(f"{len(dummy)} dummy tensors, {len(target)} target tensors, {len(weights)} weights")
    per_restart = target[0].dim() == dummy[0].dim()  # each restart matched with its own target
    if target_sq_norms is None:
        target_sq_norms = [
            t.reshape(len(t), -1).pow(2).sum(1) if per_restart else t.pow(2).sum() for t in target
        ]
    if cost in ("l2", "l1", "max"):
        total = 0
        for g, t, w in zip(dummy, target, weights, strict=True):
            diff = (g - t).reshape(g.shape[0], -1)
            if cost == "l2":
                term = diff.pow(2).sum(1)
            elif cost == "l1":
                term = diff.abs().sum(1)
            else:
                term = diff.abs().amax(1)
            total = total + w * term
        return total
    dots, dummy_sq = dots_and_squares(dummy, target)  # (L, R) each
    target_sq = torch.stack(list(target_sq_norms)).to(dots)  # (L,), or (L, R) per restart
    w = torch.as_tensor(weights, dtype=dots.dtype, device=dots.device)  # (L,)
    if cost == "sim":
        num = (w[:, None] * dots).sum(0)
        target_norm = (w[:, None] * target_sq).sum(0) if per_restart else (w * target_sq).sum()
        den = (w[:, None] * dummy_sq).sum(0).sqrt() * target_norm.sqrt()
        return 1 - num / den.clamp_min(eps)
    if cost == "simlocal":
        target_norms = target_sq.sqrt() if per_restart else target_sq.sqrt()[:, None]
        cos = dots / (dummy_sq.sqrt() * target_norms).clamp_min(eps)
        return (1 - w[:, None] * cos).sum(0)
    raise ValueError(f"unknown cost {cost!r}")


class GradientMatching:
    """The matching cost against one fixed target, with the target's selection, weights and norms prepared once.

    A plain object, not an ``nn.Module``: the attack holds it as an attribute, and DDP never broadcasts the target
    gradient as a buffer.

    Args:
        target: the target gradient or update, one tensor per victim parameter (in ``parameters()`` order).
        cost: see :func:`matching_cost`.
        selection, k, indices: which tensors to compare, see :func:`select_layers`.
        weighting: per-tensor weights, see :func:`layer_weights` (indexed over *all* tensors, then selected).
        flat: compute ``sim`` over one concatenated vector (:meth:`_flat_cosine_cost`) instead of per tensor. Same
            value; a handful of operations instead of a dozen per tensor, for one extra copy of the gradient. The
            attack uses it on GPUs, where a step pays per kernel launch. On this project's CPU the copies cost more
            than the operations saved.
    """

    def __init__(
        self,
        target: Sequence[Tensor],
        cost: Cost = "sim",
        selection: LayerSelection = "all",
        k: int | None = None,
        indices: Sequence[int] | None = None,
        weighting: LayerWeighting = "equal",
        flat: bool = False,
    ) -> None:
        self.cost = cost
        self.flat = flat and cost == "sim"
        self.indices = select_layers(target, selection, k, indices)
        all_weights = layer_weights(len(target), weighting)
        self.weights = [all_weights[i] for i in self.indices]
        self.targets = [target[i].detach().float() for i in self.indices]
        self.target_sq_norms = [t.pow(2).sum() for t in self.targets]
        if self.flat:  # one concatenated vector: see _flat_cosine_cost
            selected = [t.flatten() for t in self.targets]
            self.flat_target = torch.cat([w * t for w, t in zip(self.weights, selected, strict=True)])
            total = sum(w * t.pow(2).sum() for w, t in zip(self.weights, selected, strict=True))
            self.target_norm = torch.as_tensor(total).sqrt()
            per_entry = [
                torch.full((t.numel(),), w, device=t.device)
                for w, t in zip(self.weights, selected, strict=True)
            ]
            self.flat_weights = torch.cat(per_entry) if any(w != 1.0 for w in self.weights) else None

    def __call__(self, dummy: Sequence[Tensor]) -> Tensor:
        """``dummy``: one ``(R, *shape)`` tensor per *selected* parameter. Returns ``(R,)`` costs in fp32."""
        if self.flat:
            return self._flat_cosine_cost(dummy)
        dummy = [g if g.dtype == torch.float32 else g.float() for g in dummy]
        return matching_cost(dummy, self.targets, self.weights, self.cost, self.target_sq_norms)

    forward = __call__

    def _flat_cosine_cost(self, dummy: Sequence[Tensor]) -> Tensor:
        return flat_cosine_cost(dummy, self.flat_target, self.target_norm, self.flat_weights)


def flat_cosine_cost(
    dummy: Sequence[Tensor],
    flat_target: Tensor,
    target_norm: Tensor,
    flat_weights: Tensor | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """``sim`` over one concatenated ``(R, N)`` vector: the same value as :func:`matching_cost`.

    Per tensor, the cost and its backward dispatch about 18 operations per tensor (ResNet-18: 62 tensors, about
    1,100 operations per step), and a GPU step of a mid-size victim pays per operation. Concatenated, it is one
    copy of the gradient and a handful of operations. A product and a pairwise sum keep it as accurate as the
    per-tensor sums (about 4e-8 relative against fp64 on ResNet-18; a BLAS dot would not be).

    Args:
        dummy: one ``(R, *shape)`` tensor per compared parameter.
        flat_target: the weighted target, concatenated: ``(N,)``, or ``(R, N)`` one per restart.
        target_norm: its weighted norm: a scalar, or ``(R,)``.
        flat_weights: the weight of each of the N entries (``None``: all 1).
    """
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in dummy], dim=1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    dots = (flat * flat_target).sum(1)
    squares = flat * flat
    if flat_weights is not None:
        squares = squares * flat_weights
    norms = squares.sum(1).sqrt() * target_norm
    return 1 - dots / norms.clamp_min(eps)


class TargetStack:
    """The objective bound to T target updates at once: each slot matched with its own target in one batched cost.

    The same value as each target's :class:`GradientMatching` on its own slots. Split per target instead, the
    backward of the split writes each target's share of the dummy update into a zero tensor of the whole: T
    copies of all T slots' update per step, more than the cost itself from a few targets on (ConvNet-16, 8
    targets: a quarter of a step on the CPU).

    Args:
        matchings: the objective bound to each target (:meth:`MatchingObjective.bind_targets`: the same tensors,
            weights and cost for each).
    """

    def __init__(self, matchings: Sequence[GradientMatching]) -> None:
        first = matchings[0]
        self.cost, self.weights = first.cost, first.weights
        self.indices, self.flat = first.indices, first.flat
        self.targets = [
            torch.stack(ts) for ts in zip(*(m.targets for m in matchings), strict=True)
        ]  # (T, ...)
        self.target_sq_norms = torch.stack([torch.stack(m.target_sq_norms) for m in matchings], 1)  # (L, T)
        if self.flat:
            self.flat_target = torch.stack([m.flat_target for m in matchings])  # (T, N)
            self.target_norm = torch.stack([m.target_norm for m in matchings])  # (T,)
            self.flat_weights = first.flat_weights
        self._gathered: tuple[Tensor, tuple] | None = None  # the last owners and their targets

    def __len__(self) -> int:
        return len(self.target_sq_norms[0])

    def _per_slot(self, owners: Tensor) -> tuple:
        """The targets of slots ``owners``, kept for the next call with the same slots (every step's)."""
        if self._gathered is not None and torch.equal(self._gathered[0], owners):
            return self._gathered[1]
        if self.flat:
            selected = self.flat_target, self.target_norm
        else:
            selected = self.targets, self.target_sq_norms.T  # (T, L): targets first, like the others
        if not torch.equal(owners, torch.arange(len(self))):  # one slot per target in order needs no copy
            index = owners.to(self.target_sq_norms.device)
            selected = tuple(self._pick(x, index) for x in selected)
        if not self.flat:
            selected = selected[0], selected[1].T  # back to (L, r)
        self._gathered = owners.clone(), selected
        return selected

    @staticmethod
    def _pick(x: Tensor | list[Tensor], index: Tensor) -> Tensor | list[Tensor]:
        return [t.index_select(0, index) for t in x] if isinstance(x, list) else x.index_select(0, index)

    def __call__(self, dummy: Sequence[Tensor], owners: Tensor) -> Tensor:
        """``dummy``: one ``(r, *shape)`` tensor per selected parameter; ``owners``: ``(r,)`` the target of each
        slot (on the CPU). Returns ``(r,)`` costs in fp32."""
        if self.flat:
            flat_target, target_norm = self._per_slot(owners)
            return flat_cosine_cost(dummy, flat_target, target_norm, self.flat_weights)
        dummy = [g if g.dtype == torch.float32 else g.float() for g in dummy]
        targets, target_sq_norms = self._per_slot(owners)
        return matching_cost(dummy, targets, self.weights, self.cost, target_sq_norms)


class MatchingObjective:
    """The gradient-matching objective of the attack, chosen in YAML by ``class_path``: what is compared and how.

    Subclasses fix the cost; the options here choose the compared gradient tensors and their weights.

    Args:
        layers: which gradient tensors to compare: ``all``, ``first``/``last`` k, ``topk`` k by target-gradient
            norm, or an explicit ``list``.
        k: k for ``first``, ``last`` and ``topk``.
        indices: the tensor indices for ``layers: list`` (negative ones count from the end).
        weighting: weights of the compared tensors: ``equal``, ``linear`` ((L−i)/L) or ``exp`` (e^−i).
    """

    cost: Cost = "sim"

    def __init__(
        self,
        layers: LayerSelection = "all",
        k: PositiveInt | None = None,
        indices: list[int] | None = None,
        weighting: LayerWeighting = "equal",
    ) -> None:
        if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
            raise ValueError(f"k must be a whole number >= 1, got {k!r}")
        self.layers = layers
        self.k = None if k is None else int(k)
        self.indices = None if indices is None else [int(i) for i in indices]
        self.weighting = weighting

    def bind(self, target: Sequence[Tensor], flat: bool = False) -> GradientMatching:
        """The objective against one target update, its selection and norms prepared once.

        Raises:
            ValueError: a layer selection that does not fit the target.
        """
        return GradientMatching(target, self.cost, self.layers, self.k, self.indices, self.weighting, flat)

    def bind_targets(self, targets: Sequence[Sequence[Tensor]], flat: bool = False) -> list[GradientMatching]:
        """The objective against each of several target updates (:meth:`bind`), comparing the same tensors.

        Raises:
            InputError: a layer selection that does not fit the targets, or selects other tensors for each.
        """
        try:
            matchings = [self.bind(target, flat=flat) for target in targets]
        except ValueError as error:  # a layer selection that does not fit this victim
            raise InputError(f"objective layers {self.layers!r}: {error}") from None
        if any(m.indices != matchings[0].indices for m in matchings):
            raise InputError(f"objective layers {self.layers!r} compare other tensors for each target")
        return matchings

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


class Cosine(MatchingObjective):
    """1 − one global weighted cosine over all compared tensors (Geiping et al. 2020). Short name ``sim``."""

    cost = "sim"


class LocalCosine(MatchingObjective):
    """Σᵢ 1 − wᵢ cos(gᵢ, g*ᵢ): one cosine per compared tensor. Short name ``simlocal``."""

    cost = "simlocal"


class L2(MatchingObjective):
    """Σᵢ wᵢ‖gᵢ − g*ᵢ‖², the cost of DLG (Zhu et al. 2019). Short name ``l2``."""

    cost = "l2"


class L1(MatchingObjective):
    """Σᵢ wᵢ‖gᵢ − g*ᵢ‖₁. Short name ``l1``."""

    cost = "l1"


class MaxDifference(MatchingObjective):
    """Σᵢ wᵢ max|gᵢ − g*ᵢ|. Short name ``max``."""

    cost = "max"


#: The short names of the objectives, as configs give them (``cost: l2``).
OBJECTIVES: dict[str, type[MatchingObjective]] = {
    "sim": Cosine,
    "simlocal": LocalCosine,
    "l2": L2,
    "l1": L1,
    "max": MaxDifference,
}


def decay_milestones(max_steps: int) -> list[int]:
    """The steps at which the learning rate drops ×0.1: 3/8, 5/8 and 7/8 of the run."""
    return [round(max_steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
