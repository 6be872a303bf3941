"""Loading victim weights from local files or torchvision's hub cache, with clear errors when offline."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn


class MissingWeightsError(RuntimeError):
    """Requested weights are not on this machine (and cannot be downloaded)."""


def hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub caches (and looks for) the file behind ``url``: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from a local ``.pt``/``.pth`` (tensors only), ``.safetensors`` or ``.npz`` file.

    A checkpoint dict with a ``"state_dict"`` entry is unwrapped. An ``.npz`` is read without pickle; one saved
    as ``np.savez(path, *arrays)`` has the keys ``arr_0``, ``arr_1``, ... (see :func:`load_weights_into`).

    Raises:
        MissingWeightsError: The file does not exist, or is not readable as such a file (truncated, corrupt, or
            holding objects other than tensors and plain values); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path.resolve()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if path.suffix == ".npz":  # e.g. the global weights a Flower server sent (np.savez(path, *arrays))
            import numpy as np

            with np.load(path, allow_pickle=False) as arrays:
                return {
                    k: torch.from_numpy(np.array(arrays[k])) for k in arrays.files if not k.startswith("__")
                }
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to parse the file means a bad file
        lines = [
            line.strip() for line in str(error).splitlines() if line.strip() and "weights_only" not in line
        ]
        reason = (lines or [type(error).__name__])[-1][:300]
        raise MissingWeightsError(
            f"{path} is not a readable weights file ({reason}): expected a state dict of tensors in a .pt/.pth "
            "(loaded with weights_only=True), .safetensors or .npz file"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise MissingWeightsError(f"{path} does not hold a state dict of tensors")
    return state


def load_pretrained_state_dict(weights: Any) -> dict[str, Tensor]:
    """Load a torchvision weights enum's state dict from the hub cache, downloading it if it is absent.

    Raises:
        MissingWeightsError: The file is absent and the download failed; the message says where to put it.
    """
    try:
        return weights.get_state_dict(progress=True, weights_only=True)
    except OSError as error:  # URLError, HTTPError, timeouts, refused connections
        target = hub_checkpoint_path(weights.url)
        if target.is_file():
            raise
        raise MissingWeightsError(
            f"pretrained weights {target.name} are not on this machine and could not be downloaded ({error}). "
            f"Download {weights.url} on a connected machine and copy it to {target}"
        ) from None


def load_weights_into(model: nn.Module, path: str | Path, name: str | None = None) -> nn.Module:
    """Load the weights file ``path`` into ``model``, strictly.

    A state dict keyed by name is loaded as it is. Arrays by position (a list saved as ``arr_0``, ``arr_1``, ...
    in an ``.npz``, e.g. the global weights of a Flower round) are taken in ``model.state_dict()`` order, or in
    ``model.parameters()`` order when there are as many as parameters (the buffers then stay the model's).

    Raises:
        MissingWeightsError: the file is missing or bad, or its weights do not fit ``model``.
    """
    state = load_weights_file(path)
    name = name or type(model).__name__
    keys = list(state)
    strict = True
    if keys and all(re.fullmatch(r"arr_\d+", k) for k in keys):
        values = [state[f"arr_{i}"] for i in range(len(keys)) if f"arr_{i}" in state]
        targets = list(model.state_dict().keys())
        params = [n for n, _ in model.named_parameters()]
        if len(values) == len(targets):
            state = dict(zip(targets, values, strict=True))
        elif len(values) == len(params):
            state, strict = dict(zip(params, values, strict=True)), False
        else:
            raise MissingWeightsError(
                f"{path} holds {len(values)} arrays by position but {name} has {len(targets)} state_dict entries "
                f"({len(params)} parameters)"
            )
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as error:  # missing, unexpected or misshapen entries
        reason = " ".join(str(error).split())[:300]
        raise MissingWeightsError(f"{path}: the weights do not fit {name} ({reason})") from None
    return model
