"""Loading victim weights from local files or torchvision's hub cache, with clear errors when offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor


class MissingWeightsError(RuntimeError):
    """Requested weights are not on this machine (and cannot be downloaded)."""


def hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub caches (and looks for) the file behind ``url``: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from a local ``.pt``/``.pth`` (tensors only) or ``.safetensors`` file.

    A checkpoint dict with a ``"state_dict"`` entry is unwrapped.

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
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to parse the file means a bad file
        lines = [
            line.strip() for line in str(error).splitlines() if line.strip() and "weights_only" not in line
        ]
        reason = (lines or [type(error).__name__])[-1][:300]
        raise MissingWeightsError(
            f"{path} is not a readable weights file ({reason}): expected a state dict of tensors in a .pt/.pth "
            "(loaded with weights_only=True) or .safetensors file"
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
