"""Checkpoints that never run code, are checked on reading and survive a failed write (no Lightning here).

Every checkpoint the scripts read, local (a path or ``file://``) or remote (``http(s)://`` and the other ``fsspec``
protocols), resumed or only inspected, goes through :func:`read_checkpoint`: ``torch.load(weights_only=True)``, whose
restricted unpickler admits tensors and plain Python values only, so a crafted checkpoint cannot run its payload.
The Trainer's checkpoint plugin built on it (``lightning_inversion.cli.SafeCheckpointIO``):

    reading   always ``weights_only=True`` (Lightning's own loader unpickles remote files with
              ``weights_only=False``), and the checksum is verified.
    writing   a checksum (BLAKE2b over every tensor's bytes and every value, in order) is stored in the checkpoint,
              and a local file is written atomically: a temporary file in the same folder, flushed to disk, then
              renamed over the old one. A write that fails (a full disk) leaves the previous checkpoint intact.

A checkpoint whose contents do not match its checksum (flipped bytes in a tensor) is refused with
:class:`CheckpointError`, as is one that is truncated, unreadable or references code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

log = logging.getLogger(__name__)

CHECKSUM_KEY = "checksum"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, unreadable, corrupt, unsafe, or not of this run."""


def digest(value: Any) -> str:
    """A BLAKE2b hex digest of nested dicts, lists, tuples, tensors and plain values, in their order.

    Tensors contribute their dtype, shape and bytes (on the CPU), so a single flipped bit changes the digest.
    """
    h = hashlib.blake2b(digest_size=20)
    _feed(h, value)
    return h.hexdigest()


def _feed(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, list | tuple):
        h.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def checkpoint_checksum(checkpoint: dict) -> str:
    """The checksum of everything in a checkpoint except the stored checksum itself."""
    return digest({k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY})


def local_path(path: str | os.PathLike) -> str | None:
    """The file behind a path or a ``file://`` URL; ``None`` for a remote URL."""
    path = str(path)
    if path.startswith("file://"):
        return urlparse(path).path
    return None if "://" in path else path


def _reason(error: BaseException) -> str:
    """The informative line of a loader error (torch wraps it in advice to disable weights_only)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and not line.startswith("Check the doc")]
    return (useful or lines or [type(error).__name__])[-1][:300]


def _open_bytes(path: str) -> io.BytesIO:
    """The bytes behind a remote path: ``http(s)://`` with urllib, any other protocol through ``fsspec``."""
    if path.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(path, timeout=60) as response:  # noqa: S310 - the user's own URL
            return io.BytesIO(response.read())
    import fsspec

    with fsspec.open(path, "rb") as f:
        return io.BytesIO(f.read())


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` on the CPU, from a local path or a URL.

    Args:
        path: a file, ``file://``, ``http(s)://`` or another ``fsspec`` URL.
        verify: check the stored checksum (a checkpoint without one is read with a warning).

    Raises:
        CheckpointError: the file is missing, truncated or otherwise unreadable, references code (its payload is
            never run), is not a dict, or does not match its checksum. The message names the file.
    """
    path = str(path)
    try:
        source: Any = local_path(path)
        if source is None:
            source = _open_bytes(path)
        elif not os.path.isfile(source):
            raise CheckpointError(f"checkpoint not found: {path}")
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"it references {found.group(1)}" if found else _reason(error)
        raise CheckpointError(
            f"refused to load the checkpoint {path}: {what}. Checkpoints are read without running code "
            "(tensors and plain Python values only)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, ImportError) as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {_reason(error)}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict"
        )
    if verify:
        stored = checkpoint.get(CHECKSUM_KEY)
        if stored is None:
            log.warning(
                "%s holds no checksum (written by an older version): its integrity is not checked", path
            )
        elif stored != checkpoint_checksum(checkpoint):
            raise CheckpointError(
                f"{path} is corrupt: its contents do not match the checksum stored in it (damaged on disk or in "
                "transfer); use another checkpoint"
            )
    return checkpoint


def write_atomically(save: Callable[[io.BufferedWriter], None], path: str | os.PathLike) -> None:
    """Write a file through a temporary file in the same folder, flushed to disk, then renamed over ``path``.

    If writing fails (a full disk, a crash), ``path`` keeps its previous contents and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            save(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
