"""Label recovery from a shared gradient or weight update, before any image is reconstructed.

- One image: iDLG (Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from Gradients", 2020). The last linear layer
  ``z = W h + b`` has ``∂L/∂W_c = (p_c − 1[y=c])·hᵀ``; its features ``h`` follow a ReLU (or a pool of one), so
  ``h ≥ 0`` and only the true class has a row of negative sum.
- A batch: label *counts* from the last layer's bias/weight gradients, after Yin et al., "See through Gradients:
  Image Batch Recovery via GradInversion" (CVPR 2021) and Wainakh et al., "User-Level Label Leakage from Gradients
  in Federated Learning" (PETS 2022), in the robust form documented in :func:`batch_label_counts`.

Used by the attack of Geiping et al., "Inverting Gradients — How easy is it to break privacy in federated
learning?" (NeurIPS 2020) when the labels are not shared; the attack chooses how by a :class:`LabelStrategy`.
Nothing here imports Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_inversion.analytic import last_layer_update
from lightning_inversion.client import Update, UpdateKind

_REFINE_ROUNDS = 8


def _sign(kind: str) -> float:
    """+1 for a gradient; −1 for a FedAvg update ``−η·Σg``, so ``sign · update`` points like a gradient."""
    if kind == "gradient":
        return 1.0
    if kind in ("delta", "weights"):
        return -1.0
    raise ValueError(f"unknown update kind {kind!r}: expected 'gradient', 'delta' or 'weights'")


def _row_sums(last_weight_grad: Tensor) -> Tensor:
    if last_weight_grad.ndim < 2:
        raise ValueError(
            "the last linear layer's weight gradient must have shape (K, D) (classes × features), "
            f"got shape {tuple(last_weight_grad.shape)}"
        )
    return last_weight_grad.detach().flatten(1).double().sum(1)  # (K,)


def idlg_label(last_weight_grad: Tensor, kind: UpdateKind = "gradient") -> int:
    """The label of a single image, by iDLG.

    Args:
        last_weight_grad: ``(K, D)`` gradient (or update) of the last linear layer's weight.
        kind: ``gradient`` (FedSGD): the class whose row has the most negative sum; ``delta`` or ``weights``
            (FedAvg, ``−η·Σg``): the sign flips, so the most positive row. For ``weights`` the caller must pass
            the weight *change* ``θ_K − θ_0``, not the new weights ``θ_K``.

    Returns:
        The recovered class index.
    """
    sums = _sign(kind) * _row_sums(last_weight_grad)  # (K,)
    return int(sums.argmin())


def _allocate(target: Tensor, present: Tensor, num_images: int) -> Tensor:
    """Integer counts summing to ``num_images``, every ``present`` class ≥ 1, greedy largest remainder.

    Args:
        target: ``(K,)`` non-negative real-valued counts (summing to about ``num_images``).
        present: ``(K,)`` bool, classes known to be in the batch.
        num_images: B.
    """
    base = present.long()
    if int(base.sum()) > num_images:  # noise: keep the B present classes with the largest target
        keep = torch.where(present, target, torch.full_like(target, -torch.inf)).topk(num_images).indices
        base = torch.zeros_like(base)
        base[keep] = 1
    counts = torch.maximum(target.floor().long(), base)  # (K,)
    deficit = num_images - int(counts.sum())
    if deficit > 0:  # Σ floor(t) ≥ B − K, so at most K units are missing: one each to the largest remainders
        counts[(target - counts).topk(deficit).indices] += 1
    while deficit < 0:  # the forced ones overshot: take back from the most over-allocated class
        excess = torch.where(counts > base, counts - target, torch.full_like(target, -torch.inf))
        counts[excess.argmax()] -= 1
        deficit += 1
    return counts


def batch_label_counts(
    last_weight_grad: Tensor,
    last_bias_grad: Tensor | None = None,
    num_images: int | None = None,
    kind: UpdateKind = "gradient",
) -> Tensor:
    """The multiset of labels of a batch of ``num_images`` images, duplicates included.

    Estimator. With mean cross-entropy over B images the last layer's bias gradient is
    ``g_c = ∂L/∂b_c = p̄_c − n_c / B``, where ``p̄_c`` is the victim's softmax for class c averaged over the batch
    and ``n_c`` the number of images of class c; the weight-row sums ``Σ_d ∂L/∂W_{c,d}`` follow the same law with
    each image weighted by its feature sum ``Σ_d h_d ≥ 0``. Both sum to zero over the classes. Steps:

    1. Presence (Wainakh et al.): a class with no image has a signal ``≥ 0``, so every class whose weight-row sum
       or bias gradient is negative is in the batch and gets at least one label.
    2. Real-valued counts ``t_c = B·(α − s_c)`` (clipped at 0, rescaled to sum to B), where ``s`` is the signal
       (the bias gradient when given, which needs no ``h ≥ 0`` and weighs images equally; otherwise the row sums)
       and ``α`` the mean prediction of a class, in the signal's units:

       - a *gradient* with a bias gradient has a known scale: ``α = 1/K`` (Yin et al.), i.e.
         ``n_c ≈ B·(1/K − g_c)``. It is exact for a near-uniform softmax (an untrained victim), and since
         ``Σ_c g_c = 0`` the counts sum to B by construction; on partly trained victims it also did best of the
         variants we tried.
       - otherwise (a FedAvg update ``−η·Σg`` of unknown ``η`` and step count, or no bias) the scale is unknown.
         We model ``p̄_c = α + κ·n_c/B`` (a floor shared by all classes plus a confidence on the true class),
         which makes the signal affine in the counts, ``s_c = α' − β·n_c``. Starting from several guesses of
         ``α'`` (the median and the maximum signal of the classes step 1 left out, which are absent or nearly so,
         and points above the largest signal for when every class is present), we alternate rounding (step 3)
         and a least-squares refit of ``(α', β)`` on the integer counts until they settle, and keep the counts
         whose affine fit has the smallest residual.

    3. Rounding: greedy largest remainder to integers summing to exactly B, every present class ≥ 1.

    Reliable while B is at most about K on an untrained victim (exact on the tested B ≤ 16, K = 10); a confident,
    trained victim breaks the per-image uniformity every such estimator relies on.

    Args:
        last_weight_grad: ``(K, D)`` gradient (or update) of the last linear layer's weight.
        last_bias_grad: ``(K,)`` gradient (or update) of its bias, if the layer has one.
        num_images: the batch size B (required).
        kind: ``gradient``, ``delta`` or ``weights``; for ``weights`` pass the change ``θ_K − θ_0``.

    Returns:
        The recovered labels, sorted, as a LongTensor ``(B,)``.
    """
    if num_images is None or num_images < 1:
        raise ValueError(f"batch_label_counts needs num_images >= 1, got {num_images}")
    sign = _sign(kind)
    row_sums = sign * _row_sums(last_weight_grad)  # (K,)
    num_classes = row_sums.numel()
    present = row_sums < 0
    signal = row_sums
    if last_bias_grad is not None:
        if last_bias_grad.shape != (num_classes,):
            raise ValueError(
                f"last_bias_grad must have shape ({num_classes},) to match the weight gradient "
                f"{tuple(last_weight_grad.shape)}, got {tuple(last_bias_grad.shape)}"
            )
        signal = sign * last_bias_grad.detach().double()  # (K,)
        present |= signal < 0
    if not bool(present.any()):  # degenerate signal (e.g. dead features): the most negative class at least
        present[signal.argmin()] = True

    if kind == "gradient" and last_bias_grad is not None:
        raw = (1.0 / num_classes - signal).clamp_min(0)
        counts = _allocate(_normalise(raw, present, num_images), present, num_images)
        return torch.repeat_interleave(torch.arange(num_classes), counts.cpu())

    absent = ~present
    top, spread = signal.max(), signal.max() - signal.min()
    starts = [top + r * spread for r in (0.0, 0.25, 1 / 3, 0.5, 1.0, 2.0)]
    if bool(absent.any()):
        starts = [signal[absent].median(), signal[absent].max(), *starts]
    best, best_residual = None, float("inf")
    for alpha in starts:
        counts = _refine(signal, (alpha - signal).clamp_min(0), present, num_images)
        residual = _residual(signal, counts)
        if residual < best_residual:
            best, best_residual = counts, residual
    return torch.repeat_interleave(torch.arange(num_classes), best.cpu())


def _refine(signal: Tensor, raw: Tensor, present: Tensor, num_images: int) -> Tensor:
    """Allocate ``raw`` counts, then alternate the affine fit and the allocation until the counts settle."""
    counts = _allocate(_normalise(raw, present, num_images), present, num_images)
    for _ in range(_REFINE_ROUNDS):
        fitted = _fit(signal, counts)
        if fitted is None:
            break
        alpha, beta = fitted
        refined = _allocate(
            _normalise(((alpha - signal) / beta).clamp_min(0), present, num_images), present, num_images
        )
        if torch.equal(refined, counts):
            break
        counts = refined
    return counts


def _residual(signal: Tensor, counts: Tensor) -> float:
    """Squared residual of the affine fit ``signal ≈ α − β·counts`` (the spread of ``signal`` if degenerate)."""
    fitted = _fit(signal, counts)
    if fitted is None:
        return float(((signal - signal.mean()) ** 2).sum())
    alpha, beta = fitted
    return float(((signal - alpha + beta * counts.double()) ** 2).sum())


def _normalise(raw: Tensor, present: Tensor, num_images: int) -> Tensor:
    """Scale non-negative ``raw`` to sum to B (uniform over present classes when all are zero)."""
    total = raw.sum()
    if float(total) <= 0:
        raw = present.double()
        total = raw.sum()
    return raw * (num_images / total)


def _fit(signal: Tensor, counts: Tensor) -> tuple[Tensor, Tensor] | None:
    """Least-squares fit of ``signal ≈ α − β·counts``; ``None`` if the fit is degenerate or ``β ≤ 0``."""
    n = counts.double()
    if float(n.var(unbiased=False)) == 0:
        return None
    design = torch.stack([torch.ones_like(n), -n], 1)  # (K, 2)
    alpha, beta = torch.linalg.lstsq(design, signal.unsqueeze(1)).solution.squeeze(1)
    if float(beta) <= 0:
        return None
    return alpha, beta


class LabelStrategy:
    """How the attack gets the labels of the client's images, chosen in YAML by ``class_path`` (or a short name).

    :meth:`labels` returns the hard labels ``(B,)`` the attack uses, or ``None`` when the labels are optimised
    with the images (:attr:`soft`).
    """

    #: The name reported in the results (``labels_from``).
    name = ""
    #: Whether the labels are soft-label logits optimised jointly with the images (DLG).
    soft = False

    def resolve(self, update: Update | None, num_images: int) -> LabelStrategy:
        """The strategy that applies to ``update`` (itself, except for :class:`AutoLabels`)."""
        return self

    def labels(self, update: Update, victim: nn.Module, num_images: int, num_classes: int) -> Tensor | None:
        """The labels of the client's ``num_images`` images.

        Raises:
            ValueError: the strategy cannot recover labels from this update or victim (the message says why).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GivenLabels(LabelStrategy):
    """The labels the client shared with its update. Short name ``given``."""

    name = "given"

    def labels(self, update: Update, victim: nn.Module, num_images: int, num_classes: int) -> Tensor:
        if update.labels is None:
            raise ValueError(
                "the labels are not known: pass them with the update, or choose label_strategy "
                "'idlg' (one image), 'batch' or 'dlg'"
            )
        if update.labels.shape != (num_images,):
            raise ValueError(f"labels of shape {tuple(update.labels.shape)}, expected ({num_images},)")
        return update.labels.long()


class IDLG(LabelStrategy):
    """The label of one image from the last layer's update (:func:`idlg_label`). Short name ``idlg``."""

    name = "idlg"

    def labels(self, update: Update, victim: nn.Module, num_images: int, num_classes: int) -> Tensor:
        if num_images != 1:
            raise ValueError("iDLG recovers the label of one image; use label_strategy 'batch' for B > 1")
        weight, _ = last_layer_update(victim, update, num_classes)
        return torch.tensor([idlg_label(weight, update.kind)])


class BatchCounts(LabelStrategy):
    """The labels of a batch, duplicates included, from the last layer's update (:func:`batch_label_counts`).
    Short name ``batch``."""

    name = "batch"

    def labels(self, update: Update, victim: nn.Module, num_images: int, num_classes: int) -> Tensor:
        weight, bias = last_layer_update(victim, update, num_classes)
        return batch_label_counts(weight, bias, num_images, update.kind)


class SoftLabels(LabelStrategy):
    """DLG (Zhu, Liu, Han 2019): soft-label logits, one per image and restart, optimised with the images.
    Short name ``dlg``."""

    name = "dlg"
    soft = True

    def labels(self, update: Update, victim: nn.Module, num_images: int, num_classes: int) -> None:
        return None


class AutoLabels(LabelStrategy):
    """:class:`GivenLabels` when the update carries labels, else :class:`IDLG` for one image and
    :class:`BatchCounts` for several. Short name ``auto``."""

    name = "auto"

    def resolve(self, update: Update | None, num_images: int) -> LabelStrategy:
        if update is not None and update.labels is not None:
            return GivenLabels()
        return IDLG() if num_images == 1 else BatchCounts()

    def labels(self, update: Update, victim: nn.Module, num_images: int, num_classes: int) -> Tensor | None:
        return self.resolve(update, num_images).labels(update, victim, num_images, num_classes)


#: The short names of the label strategies, as configs give them (``label_strategy: dlg``).
LABEL_STRATEGIES: dict[str, type[LabelStrategy]] = {
    cls.name: cls for cls in (AutoLabels, GivenLabels, IDLG, BatchCounts, SoftLabels)
}
