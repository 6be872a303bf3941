"""What the attacker assumed: the threat model behind a reconstruction's numbers.

Two PSNRs are comparable only under the same assumptions. Each reconstruction records, beside its metrics:

- ``labels``: ``given`` (shared with the update), ``recovered (idlg)``, ``recovered (batch)`` (from the last
  layer's update) or ``optimised (dlg)`` (soft labels optimised with the images);
- ``batchnorm_statistics``: the reference statistics a BatchNorm-statistics prior matched: ``none`` (no such
  prior), ``running`` (the victim's running statistics, i.e. its training set's) or ``recovered`` (the private
  batch's own, solved from the update's moved buffers);
- ``num_images``: the number of images the attacker reconstructs, and ``num_images_from``: ``update`` when the
  update said how many images it came from, ``assumed`` when the attacker had to set it;
- ``client_mode``: ``eval`` or ``train`` (BatchNorm on the batch's statistics).

Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# What each statistics source assumes the attacker knows; a source may also say so itself (``assumption``).
STATISTICS_ASSUMPTIONS = {"RunningStatistics": "running", "RecoveredStatistics": "recovered"}
LABELS = {
    "given": "given",
    "idlg": "recovered (idlg)",
    "batch": "recovered (batch)",
    "dlg": "optimised (dlg)",
}
# The columns an evaluation table gives the threat model, in order.
COLUMNS = ("labels", "batchnorm_statistics", "num_images", "num_images_from", "client_mode")


def statistics_assumption(priors: Iterable[Any]) -> str:
    """``none``, or the reference(s) of the priors that match BatchNorm statistics, joined by ``+``."""
    found: list[str] = []
    for prior in priors:
        source = getattr(prior, "reference", None)
        if source is None or not float(getattr(prior, "weight", 1.0)):
            continue
        name = getattr(source, "assumption", None) or STATISTICS_ASSUMPTIONS.get(
            type(source).__name__, type(source).__name__
        )
        if name not in found:
            found.append(name)
    return "+".join(found) or "none"


def threat_model(
    labels_from: str,
    priors: Iterable[Any],
    num_images: int,
    num_images_known: bool,
    train_mode: bool,
) -> dict[str, Any]:
    """The attacker's assumptions behind one reconstruction (the keys of :data:`COLUMNS`).

    Args:
        labels_from: the label strategy in use (``given``, ``idlg``, ``batch`` or ``dlg``).
        priors: the attack's image priors.
        num_images: the number of images reconstructed.
        num_images_known: whether the update said how many images it came from.
        train_mode: whether the client ran the victim in training mode.
    """
    return {
        "labels": LABELS.get(labels_from, labels_from),
        "batchnorm_statistics": statistics_assumption(priors),
        "num_images": int(num_images),
        "num_images_from": "update" if num_images_known else "assumed",
        "client_mode": "train" if train_mode else "eval",
    }


def target_threat_model(
    label_strategy: Any, update: Any, priors: Iterable[Any], num_images: int, train_mode: bool
) -> dict[str, Any]:
    """:func:`threat_model` of an attack on one target update (``None``: not known yet): its label strategy
    resolved against the update, and whether the update said how many images it came from."""
    labels_from = label_strategy.resolve(update, num_images).name if update is not None else None
    known = update is not None and update.num_images is not None
    return threat_model(labels_from, priors, num_images, known, train_mode)
