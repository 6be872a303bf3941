"""Client updates from outside the simulation: files saved by a real federated-learning stack.

The attack of Geiping et al., "Inverting Gradients — How easy is it to break privacy in federated learning?"
(NeurIPS 2020) needs only the shared gradient or weight update (DLG, Zhu et al. 2019; iDLG, Zhao et al. 2020;
label counts, Wainakh et al. 2022 / Yin et al. 2021; the linear layer, Phong et al. 2017). A file from elsewhere
is untrusted, so it is read without ever unpickling code: ``.safetensors`` (tensors only, by design) or
``.pt``/``.pth`` through ``torch.load(weights_only=True)``, whose restricted unpickler admits tensors and plain
Python values and refuses everything else before it runs. Nothing here imports Lightning.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_inversion.client import Update, update_problem
from lightning_inversion.errors import InputError

KINDS = ("gradient", "delta", "weights")
RESERVED = "__"  # safetensors keys with this prefix are not parameters
LABELS_KEY = "__labels__"
FORMAT = "lightning_inversion.update/1"
_PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "victim.")


class UpdateFileError(InputError):
    """An update file that is missing, unsafe, malformed, or does not fit the victim."""


def _plain(value: Any) -> Any:
    """``value`` if it is built from plain JSON-like Python values only, else its ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def save_update(update: Update, path: str | Path) -> None:
    """Write ``update`` to ``.safetensors`` or ``.pt``/``.pth`` (plain tensors and values only).

    ``.safetensors`` keys the tensors by parameter name, stores the labels as ``__labels__`` and the rest (kind,
    parameter order, batch size, number of clients, meta) as string metadata. ``.pt`` stores a plain dict like
    :meth:`Update.state_dict`, which :func:`load_update` reads with ``weights_only=True``.
    """
    path = Path(path)
    if len(update.names) != len(update.tensors):
        raise ValueError(f"the update has {len(update.tensors)} tensors but {len(update.names)} names")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        bad = [n for n in update.names if n.startswith(RESERVED)]
        if bad or len(set(update.names)) != len(update.names):
            raise ValueError(f"parameter names must be unique and not start with {RESERVED!r}: {bad}")
        # contiguous private copies: safetensors refuses views and shared storage
        tensors = {
            n: t.detach().cpu().contiguous().clone()
            for n, t in zip(update.names, update.tensors, strict=True)
        }
        if update.labels is not None:
            tensors[LABELS_KEY] = update.labels.detach().cpu().long().contiguous().clone()
        metadata = {
            "format": FORMAT,
            "kind": update.kind,
            "names": json.dumps(list(update.names)),
            "num_images": json.dumps(update.num_images),
            "num_clients": json.dumps(update.num_clients),
            "meta": json.dumps(_plain(update.meta)),
        }
        save_file(tensors, str(path), metadata=metadata)
    elif path.suffix in (".pt", ".pth"):
        state = update.state_dict()
        state["meta"] = _plain(state["meta"])
        state["format"] = FORMAT
        torch.save(state, path)
    else:
        raise ValueError(
            f"unknown update file type {path.suffix!r} for {path}: use .safetensors, .pt or .pth"
        )


def _read(path: Path) -> tuple[Any, dict[str, str]]:
    """The raw object in the file and, for safetensors, its metadata."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except Exception as error:  # any parse failure means a bad file
            raise UpdateFileError(f"{path} is not a readable safetensors file: {error}") from error
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), {}
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            if found is None:
                raise UpdateFileError(
                    f"{path} is not a torch file that loads with weights_only=True (corrupt, or it needs objects "
                    f"other than tensors and plain Python values): {_reason(error)}"
                ) from error
            raise UpdateFileError(
                f"refused to load {path}: it references {found.group(1)}, and unpickling it could run arbitrary "
                "code. Only tensors and plain Python values are read: save the update as a dict of tensors, a "
                "list of tensors, or with save_update (.safetensors is safe by design)."
            ) from error
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            raise UpdateFileError(f"{path} could not be read as a torch file: {_reason(error)}") from error
    raise UpdateFileError(
        f"unknown update file type {path.suffix!r} for {path}: use .safetensors, .pt or .pth"
    )


def _reason(error: Exception) -> str:
    """The informative line of a loader error (torch wraps it in advice to disable weights_only)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and not line.startswith("Check the doc")]
    return (useful or lines or [repr(error)])[-1]


def _check_tensors(items: Sequence[tuple[str, Any]], path: Path) -> None:
    for i, (name, value) in enumerate(items):
        if not isinstance(value, Tensor):
            raise UpdateFileError(
                f"{path}: entry {name!r} (index {i}) is a {type(value).__name__}, not a tensor"
            )


def _strip_prefix(keys: list[str], wanted: set[str]) -> dict[str, str]:
    """Map file keys to victim names, dropping a prefix shared by all keys (``module.``...) if that helps."""
    mapping = {k: k for k in keys}
    for _ in range(3):  # e.g. "module.model.fc.weight"
        if wanted <= set(mapping.values()):
            break
        values = list(mapping.values())
        prefix = next((p for p in _PREFIXES if values and all(v.startswith(p) for v in values)), None)
        if prefix is None:
            break
        mapping = {k: v[len(prefix) :] for k, v in mapping.items()}
    return mapping


def _fit_victim(
    names: list[str] | None, tensors: list[Tensor], victim: nn.Module, path: Path
) -> tuple[list[str], list[Tensor]]:
    """Check the tensors against the victim's parameters and put them in its order."""
    params = list(victim.named_parameters())
    expected = [n for n, _ in params]
    if names is None:
        if len(tensors) != len(params):
            raise UpdateFileError(
                f"{path} holds {len(tensors)} tensors but the victim has {len(params)} parameters "
                f"({', '.join(expected[:4])}{', ...' if len(expected) > 4 else ''})"
            )
        ordered = list(tensors)
    else:
        mapping = _strip_prefix(names, set(expected))
        by_name = {mapping[n]: t for n, t in zip(names, tensors, strict=True)}
        missing = [(i, n) for i, n in enumerate(expected) if n not in by_name]
        if missing:
            i, n = missing[0]
            raise UpdateFileError(
                f"{path} has no tensor for victim parameter {n!r} (index {i}, shape "
                f"{tuple(params[i][1].shape)})"
                + (f" nor for {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        extra = [k for k, v in mapping.items() if v not in set(expected)]
        if extra:
            raise UpdateFileError(f"{path} has tensors the victim does not have: {extra[:8]}")
        ordered = [by_name[n] for n in expected]
    for i, ((name, param), tensor) in enumerate(zip(params, ordered, strict=True)):
        if tensor.shape != param.shape:
            raise UpdateFileError(
                f"{path}: tensor {name!r} (index {i}) has shape {tuple(tensor.shape)}, the victim expects "
                f"{tuple(param.shape)}"
            )
    return expected, ordered


def load_update(path: str | Path, victim: nn.Module | None = None, kind: str | None = None) -> Update:
    """Read an update from a file without ever unpickling code.

    Accepted contents: a dict parameter name -> tensor, a list/tuple of tensors in ``victim.parameters()`` order,
    or what :func:`save_update` (or :meth:`Update.state_dict`) writes.

    Args:
        path: a ``.safetensors``, ``.pt`` or ``.pth`` file.
        victim: if given, every victim parameter must be present (a common ``module.``/``model.`` prefix on the
            file's keys is tolerated), no extra tensor may be, every shape must match, and the tensors are
            returned in the victim's parameter order.
        kind: ``gradient``, ``delta`` or ``weights``: what the update is when the file does not say (default
            ``gradient``). A file that records another kind is refused.

    The returned update's ``meta["recorded"]`` lists what the file itself recorded among ``kind`` and
    ``num_clients`` (see :meth:`~lightning_inversion.client.Client.matching`).

    Raises:
        UpdateFileError: a missing, unsafe or malformed file, one that does not fit ``victim``, one that holds NaN
            or infinite values, no change at all, or labels that are not class indices, or one whose recorded
            kind contradicts ``kind``.
    """
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise UpdateFileError(f"unknown update kind {kind!r}: expected one of {KINDS}")
    if not path.is_file():
        raise UpdateFileError(f"update file not found: {path}")
    obj, metadata = _read(path)

    labels, num_images, num_clients, meta, file_kind = None, None, 1, {}, None
    recorded: list[str] = []
    names: list[str] | None
    if isinstance(obj, Mapping) and "tensors" in obj:  # save_update / Update.state_dict
        raw = obj["tensors"]
        if not isinstance(raw, (list, tuple)):
            raise UpdateFileError(f"{path}: 'tensors' must be a list of tensors, got {type(raw).__name__}")
        tensors = list(raw)
        names = obj.get("names")
        if names is not None and (
            not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)
        ):
            raise UpdateFileError(f"{path}: 'names' must be a list of strings")
        if names is not None and len(names) != len(tensors):
            raise UpdateFileError(f"{path}: {len(names)} names for {len(tensors)} tensors")
        names = None if names is None else list(names)
        _check_tensors(list(zip(names or [str(i) for i in range(len(tensors))], tensors, strict=True)), path)
        labels, file_kind = obj.get("labels"), obj.get("kind")
        num_images, num_clients = obj.get("num_images"), obj.get("num_clients") or 1
        recorded += ["num_clients"] if obj.get("num_clients") is not None else []
        meta = obj.get("meta") or {}
    elif isinstance(obj, Mapping):  # name -> tensor (a safetensors file, or a plain state dict)
        items = [(str(k), v) for k, v in obj.items() if not str(k).startswith(RESERVED)]
        _check_tensors(items, path)
        labels = obj.get(LABELS_KEY)
        try:
            order = json.loads(metadata["names"]) if "names" in metadata else None
            num_images = json.loads(metadata.get("num_images", "null"))
            num_clients = json.loads(metadata.get("num_clients", "1")) or 1
            meta = json.loads(metadata.get("meta", "{}"))
        except json.JSONDecodeError as error:
            raise UpdateFileError(f"{path}: malformed metadata: {error}") from error
        if isinstance(order, list) and sorted(order) == sorted(n for n, _ in items):
            by_name = dict(items)
            items = [(n, by_name[n]) for n in order]  # the parameter order save_update recorded
        names, tensors = [n for n, _ in items], [t for _, t in items]
        file_kind = metadata.get("kind")
        recorded += ["num_clients"] if "num_clients" in metadata else []
    elif isinstance(obj, (list, tuple)):
        tensors, names = list(obj), None
        _check_tensors([(str(i), t) for i, t in enumerate(tensors)], path)
    else:
        raise UpdateFileError(
            f"{path} holds a {type(obj).__name__}; expected a dict of tensors, a list of tensors or a saved update"
        )

    for key, value in (("num_images", num_images), ("num_clients", num_clients)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UpdateFileError(f"{path}: {key} must be a positive integer, got {value!r}")
    if file_kind is not None and file_kind not in KINDS:
        raise UpdateFileError(f"{path}: unknown update kind {file_kind!r} in the file")
    if file_kind is not None:
        recorded.append("kind")
        if kind is not None and kind != file_kind:
            raise UpdateFileError(f"{path} records a {file_kind!r} update, not the {kind!r} asked for")
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise UpdateFileError(f"{path}: labels must be a tensor, got {type(labels).__name__}")
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            raise UpdateFileError(f"{path}: labels must be whole class indices, got {labels.tolist()}")
        labels = labels.long()
        num_images = num_images if num_images is not None else labels.shape[0]

    if victim is not None:
        names, tensors = _fit_victim(names, tensors, victim, path)
    elif names is None:
        names = [str(i) for i in range(len(tensors))]
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    meta["recorded"] = recorded
    update = Update(
        tensors,
        names,
        file_kind or kind or "gradient",
        labels=labels,
        num_images=num_images,
        num_clients=int(num_clients),
        meta=meta,
    )
    problem = update_problem(update, victim)
    if problem is not None:
        raise UpdateFileError(f"{path}: {problem}")
    return update
