"""Rebuilding a trained victim from a ``train_victim.py`` checkpoint, without Lightning and without unpickling code."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from lightning_inversion.checkpoints import CheckpointError, read_checkpoint
from lightning_inversion.victims.registry import build_victim
from lightning_inversion.victims.weights import MissingWeightsError

_EXPECTED = (
    "a Lightning checkpoint (.ckpt) written by `python train_victim.py fit`, holding the hyper_parameters "
    "victim, num_classes, image_shape, mean, std and the victim.* weights in its state_dict"
)
_META_KEYS = ("victim", "num_classes", "image_shape", "mean", "std")
_PREFIX = "victim."


def _read(path: str) -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True`` (tensors and plain containers only) and verified."""
    if not os.path.isfile(path):
        raise MissingWeightsError(f"victim checkpoint not found: {path} (expected {_EXPECTED})")
    try:
        checkpoint = read_checkpoint(path)  # weights_only=True, and its checksum verified
    except CheckpointError as error:
        raise MissingWeightsError(f"{error}; expected {_EXPECTED}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise MissingWeightsError(f"{path} has no state_dict; expected {_EXPECTED}")
    hparams = checkpoint.get("hyper_parameters")
    missing = [key for key in _META_KEYS if not isinstance(hparams, dict) or key not in hparams]
    if missing:
        raise MissingWeightsError(
            f"{path} lacks the hyper-parameters {', '.join(missing)}; expected {_EXPECTED}"
        )
    return checkpoint


def load_victim_checkpoint(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the victim trained by ``train_victim.py`` from its checkpoint.

    Args:
        path: a ``.ckpt`` file written by :class:`lightning_inversion.classifier.VictimClassifier` training.

    Returns:
        The victim in eval mode on the CPU, and its description ``{"victim": name, "num_classes": int,
        "image_shape": (C, H, W), "mean": tuple, "std": tuple}`` (inputs are normalised with mean and std).

    Raises:
        MissingWeightsError: the file is missing, or is not such a checkpoint; the message names the path.
    """
    checkpoint = _read(path)
    hparams = checkpoint["hyper_parameters"]
    try:
        meta = {
            "victim": str(hparams["victim"]),
            "num_classes": int(hparams["num_classes"]),
            "image_shape": tuple(int(s) for s in hparams["image_shape"]),
            "mean": tuple(float(m) for m in hparams["mean"]),
            "std": tuple(float(s) for s in hparams["std"]),
        }
        victim = build_victim(meta["victim"], meta["num_classes"], meta["image_shape"])
    except (KeyError, TypeError, ValueError) as error:
        raise MissingWeightsError(
            f"{path}: cannot rebuild the victim ({error}); expected {_EXPECTED}"
        ) from None
    state = {k[len(_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_PREFIX)}
    try:
        victim.load_state_dict(state)
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:300]
        raise MissingWeightsError(f"{path}: the weights do not fit {meta['victim']} ({reason})") from None
    return victim.eval(), meta
