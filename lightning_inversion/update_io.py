"""Client updates from outside the simulation: files saved by a real federated-learning stack.

The attack of Geiping et al., "Inverting Gradients — How easy is it to break privacy in federated learning?"
(NeurIPS 2020) needs only the shared gradient or weight update (DLG, Zhu et al. 2019; iDLG, Zhao et al. 2020;
label counts, Wainakh et al. 2022 / Yin et al. 2021; the linear layer, Phong et al. 2017). A file from elsewhere
is untrusted, so it is read without ever unpickling code: ``.safetensors`` (tensors only, by design) or
``.pt``/``.pth`` through ``torch.load(weights_only=True)``, whose restricted unpickler admits tensors and plain
Python values and refuses everything else before it runs. Nothing here imports Lightning.
"""

from __future__ import annotations

import dataclasses
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
BUFFER_PREFIX = "__buffer_change__."  # safetensors keys of Update.buffer_changes
META_KEY = "__meta__"  # .npz: the update's description, a JSON string (a unicode array: no pickle)
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
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

    ``.safetensors`` keys the tensors by parameter name, stores the labels as ``__labels__``, the buffer changes
    as ``__buffer_change__.NAME`` and the rest (kind, parameter order, batch size, number of clients, meta) as
    string metadata. ``.pt`` stores a plain dict like :meth:`Update.state_dict`, which :func:`load_update` reads
    with ``weights_only=True``.
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
        for n, b in update.buffer_changes.items():
            tensors[BUFFER_PREFIX + n] = b.detach().cpu().contiguous().clone()
        metadata = {
            "format": FORMAT,
            "kind": update.kind,
            "names": json.dumps(list(update.names)),
            "num_images": json.dumps(update.num_images),
            "num_clients": json.dumps(update.num_clients),
            "meta": json.dumps(_plain(update.meta)),
        }
        save_file(tensors, str(path), metadata=metadata)
    elif path.suffix == ".npz":
        import numpy as np

        bad = [n for n in update.names if n.startswith(RESERVED)]
        if bad or len(set(update.names)) != len(update.names):
            raise ValueError(f"parameter names must be unique and not start with {RESERVED!r}: {bad}")

        def array(t: Tensor):
            t = t.detach().cpu()
            return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

        arrays = {n: array(t) for n, t in zip(update.names, update.tensors, strict=True)}
        arrays |= {BUFFER_PREFIX + n: array(b) for n, b in update.buffer_changes.items()}
        if update.labels is not None:
            arrays[LABELS_KEY] = array(update.labels.long())
        description = {
            "format": FORMAT,
            "kind": update.kind,
            "names": list(update.names),
            "num_images": update.num_images,
            "num_clients": update.num_clients,
            "meta": _plain(update.meta),
        }
        arrays[META_KEY] = np.array(json.dumps(description))  # a unicode array: reads without pickle
        with open(path, "wb") as f:  # a file object: np.savez appends no second suffix
            np.savez(f, **arrays)
    elif path.suffix in (".pt", ".pth"):
        state = update.state_dict()
        state["meta"] = _plain(state["meta"])
        state["format"] = FORMAT
        torch.save(state, path)
    else:
        raise ValueError(
            f"unknown update file type {path.suffix!r} for {path}: use .safetensors, .npz, .pt or .pth"
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
    if path.suffix in (".npz", ".npy"):
        return _read_numpy(path)
    raise UpdateFileError(
        f"unknown update file type {path.suffix!r} for {path}: use .safetensors, .npz, .pt or .pth"
    )


def _read_numpy(path: Path) -> tuple[Any, dict[str, str]]:
    """A ``.npz`` as a dict (``np.savez(path, **named)``) or a list (``np.savez(path, *arrays)``) of tensors,
    with its ``__meta__`` (a JSON object: ``kind``, ``num_images``, ``num_clients``, ``names``, ``meta``) as
    safetensors-like string metadata; a ``.npy`` as a list of its one array. Never with ``allow_pickle``: object
    arrays are refused."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as loaded:
            if isinstance(loaded, np.ndarray):  # .npy: one array
                return [torch.from_numpy(np.array(loaded))], {}
            arrays = {k: loaded[k] for k in loaded.files}
    except ValueError as error:
        if "pickle" in str(error):
            raise UpdateFileError(
                f"refused to load {path}: it holds Python objects (an object array), and reading them needs "
                "pickle, which could run arbitrary code. Save the arrays themselves: np.savez(path, *arrays) "
                "or np.savez(path, **{name: array})"
            ) from error
        raise UpdateFileError(f"{path} is not a readable NumPy file: {error}") from error
    except (OSError, EOFError) as error:
        raise UpdateFileError(f"{path} is not a readable NumPy file: {error}") from error
    meta: dict = {}
    if META_KEY in arrays:
        try:
            meta = json.loads(str(arrays.pop(META_KEY)))
        except json.JSONDecodeError as error:
            raise UpdateFileError(f"{path}: malformed {META_KEY}: {error}") from error
        if not isinstance(meta, dict):
            raise UpdateFileError(f"{path}: {META_KEY} must be a JSON object")
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    if tensors and all(re.fullmatch(r"arr_\d+", k) for k in tensors):  # np.savez(path, *arrays)
        ordered = [tensors[f"arr_{i}"] for i in range(len(tensors)) if f"arr_{i}" in tensors]
        if len(ordered) != len(tensors):
            raise UpdateFileError(f"{path}: the positional arrays arr_0, arr_1, ... have gaps")
        body: Any = ordered
    else:
        body = tensors
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    return body, metadata


def _reason(error: Exception) -> str:
    """The informative line of a loader error (torch wraps it in advice to disable weights_only)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and not line.startswith("Check the doc")]
    return (useful or lines or [repr(error)])[-1]


def _as_tensors(items: Sequence[tuple[str, Any]], source: str) -> list[Tensor]:
    """The values as tensors (NumPy arrays converted), each checked to be one."""
    out = []
    for i, (name, value) in enumerate(items):
        if not isinstance(value, Tensor):
            if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
                if value.dtype.hasobject:
                    raise UpdateFileError(
                        f"{source}: entry {name!r} (index {i}) is an object array, not numbers"
                    )
                import numpy as np

                value = torch.from_numpy(np.array(value))
            else:
                raise UpdateFileError(
                    f"{source}: entry {name!r} (index {i}) is a {type(value).__name__}, not a tensor"
                )
        out.append(value)
    return out


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


def _is_buffer_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES


def _split(
    names: list[str] | None, tensors: list[Tensor], victim: nn.Module | None, source: str
) -> tuple[list[str], list[Tensor], dict[str, Tensor]]:
    """Parameters (in the victim's parameter order when it is given) and buffers (by name) of the update.

    By name: a victim's parameter name is a parameter, a victim's buffer name a buffer (without a victim, names
    ending in ``running_mean``, ``running_var`` or ``num_batches_tracked``). By position: as many tensors as the
    victim has parameters are its parameters; as many as its ``state_dict()`` has entries are those entries, in
    that order (what Flower clients send: ``[v.numpy() for v in net.state_dict().values()]``).
    """
    if victim is None:
        if names is None:
            return [str(i) for i in range(len(tensors))], tensors, {}
        params = [(n, t) for n, t in zip(names, tensors, strict=True) if not _is_buffer_name(n)]
        buffers = {n: t for n, t in zip(names, tensors, strict=True) if _is_buffer_name(n)}
        return [n for n, _ in params], [t for _, t in params], buffers
    params = list(victim.named_parameters())
    expected = [n for n, _ in params]
    victim_buffers = dict(victim.named_buffers())
    if names is None:
        state_keys = list(victim.state_dict().keys())
        if len(tensors) == len(params):
            names = expected
        elif len(tensors) == len(state_keys):
            names = state_keys
        else:
            with_buffers = (
                f" (or {len(state_keys)} state_dict entries with its buffers)"
                if len(state_keys) != len(params)
                else ""
            )
            raise UpdateFileError(
                f"{source} holds {len(tensors)} tensors but the victim has {len(params)} parameters"
                f"{with_buffers} ({', '.join(expected[:4])}{', ...' if len(expected) > 4 else ''})"
            )
        mapping = {n: n for n in names}
    else:
        mapping = _strip_prefix(names, set(expected))
    by_name = {mapping[n]: t for n, t in zip(names, tensors, strict=True)}
    missing = [(i, n) for i, n in enumerate(expected) if n not in by_name]
    if missing:
        i, n = missing[0]
        raise UpdateFileError(
            f"{source} has no tensor for victim parameter {n!r} (index {i}, shape "
            f"{tuple(params[i][1].shape)})"
            + (f" nor for {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    extra = [k for k, v in mapping.items() if v not in set(expected) and v not in victim_buffers]
    if extra:
        raise UpdateFileError(f"{source} has tensors the victim does not have: {extra[:8]}")
    ordered = [by_name[n] for n in expected]
    for i, ((name, param), tensor) in enumerate(zip(params, ordered, strict=True)):
        if tensor.shape != param.shape:
            raise UpdateFileError(
                f"{source}: tensor {name!r} (index {i}) has shape {tuple(tensor.shape)}, the victim expects "
                f"{tuple(param.shape)}"
            )
    buffers = {n: by_name[n] for n in victim_buffers if n in by_name}
    _check_buffer_shapes(buffers, victim_buffers, source)
    return expected, ordered, buffers


def _check_buffer_shapes(
    buffers: Mapping[str, Tensor], victim_buffers: Mapping[str, Tensor], source: str
) -> None:
    for name, tensor in buffers.items():
        if name not in victim_buffers:
            raise UpdateFileError(f"{source}: buffer {name!r} is not a buffer of the victim")
        if tensor.numel() != victim_buffers[name].numel():
            raise UpdateFileError(
                f"{source}: buffer {name!r} has shape {tuple(tensor.shape)}, the victim's has "
                f"{tuple(victim_buffers[name].shape)}"
            )


def _buffer_changes(
    buffers: dict[str, Tensor], kind: str, victim: nn.Module | None, meta: dict
) -> dict[str, Tensor]:
    """The buffers an update carries as changes ``new − global``: a ``delta`` sends them so; ``weights`` (and a
    gradient, which has no gradient of a buffer to send) send the new values, from which the victim's own buffers
    (the global ones) are subtracted. Without a victim those new values cannot be read: ``meta`` names them."""
    if not buffers:
        return {}
    if kind == "delta":
        return {n: b.clone() for n, b in buffers.items()}
    if victim is None:
        meta["buffers_unread"] = sorted(buffers)
        return {}
    start = dict(victim.named_buffers())
    return {
        n: b.reshape(start[n].shape).to(start[n].dtype) - start[n].detach().cpu() for n, b in buffers.items()
    }


def _flower_parameters(obj: Any) -> list[Any] | None:
    """The arrays of a Flower ``Parameters`` object (``flwr.common.parameters_to_ndarrays``), or ``None`` if
    ``obj`` is not one."""
    if not (hasattr(obj, "tensors") and hasattr(obj, "tensor_type") and type(obj).__name__ == "Parameters"):
        return None
    try:
        from flwr.common import parameters_to_ndarrays
    except ImportError as error:  # pragma: no cover - flwr is what made the object
        raise UpdateFileError(
            "reading Flower Parameters needs flwr: pip install 'lightning-inversion[flower]'"
        ) from error
    if obj.tensor_type != "numpy.ndarray":
        raise UpdateFileError(
            f"Flower Parameters of tensor_type {obj.tensor_type!r}: only numpy.ndarray is read"
        )
    try:
        return parameters_to_ndarrays(obj)  # np.load(..., allow_pickle=False) for each tensor
    except ValueError as error:
        raise UpdateFileError(f"Flower Parameters that do not read without pickle: {error}") from error


def existing_update_file(source: str | Path) -> Path:
    """``source`` as a path to an existing file.

    Raises:
        UpdateFileError: there is no file at ``source``.
    """
    path = Path(source)
    if not path.is_file():
        raise UpdateFileError(f"update file not found: {path}")
    return path


def load_update(
    source: str | Path | Any,
    victim: nn.Module | None = None,
    kind: str | None = None,
    default_kind: str | None = None,
) -> Update:
    """Read an update from a file, or from arrays in memory, without ever unpickling code.

    Accepted contents: a dict name -> tensor or array, a list/tuple of tensors or arrays in ``victim.parameters()``
    order or in ``victim.state_dict()`` order (parameters and buffers, as Flower clients send them), or what
    :func:`save_update` (or :meth:`Update.state_dict`) writes. Files: ``.safetensors``, ``.pt``/``.pth``
    (``weights_only=True``), ``.npz`` (``np.savez(path, *arrays)`` or ``np.savez(path, **named)``, with an
    optional ``__meta__`` JSON string: ``kind``, ``num_images``, ``num_clients``, ``meta``; ``allow_pickle``
    is never set, so object arrays are refused). In memory: a list or dict of arrays, or a Flower ``Parameters``
    object (through ``flwr.common.parameters_to_ndarrays``).

    Buffers (BatchNorm's running statistics and step counters) are recognised by name, or by position against
    the victim's ``state_dict()``, and kept apart from the parameters as :attr:`Update.buffer_changes`.

    Args:
        source: a file path, or the arrays themselves.
        victim: if given, every victim parameter must be present (a common ``module.``/``model.`` prefix on the
            file's keys is tolerated), no tensor may be neither a parameter nor a buffer of it, every shape must
            match, and the tensors are returned in the victim's parameter order. Its buffers are the global ones
            that new buffer values are compared with.
        kind: ``gradient``, ``delta`` or ``weights``: what the update is when the file does not say (default
            ``gradient``). A file that records another kind is refused.
        default_kind: what the update is when the file does not say, without refusing a file that records
            another kind (the caller compares then).

    The returned update's ``meta["recorded"]`` lists what the file itself recorded among ``kind`` and
    ``num_clients`` (see :meth:`~lightning_inversion.client.Client.matching`).

    Raises:
        UpdateFileError: a missing, unsafe or malformed file, one that does not fit ``victim``, one that holds NaN
            or infinite values, no change at all, or labels that are not class indices, or one whose recorded
            kind contradicts ``kind``.
    """
    for option in (kind, default_kind):
        if option is not None and option not in KINDS:
            raise UpdateFileError(f"unknown update kind {option!r}: expected one of {KINDS}")
    metadata: dict[str, str] = {}
    if isinstance(source, (str, Path)):
        path = existing_update_file(source)
        name = str(path)
        obj, metadata = _read(path)
    else:
        name = "the update"
        flower = _flower_parameters(source)
        obj = flower if flower is not None else source

    labels, num_images, num_clients, meta, file_kind = None, None, 1, {}, None
    recorded: list[str] = []
    names: list[str] | None
    stored_changes: dict[str, Tensor] = {}
    if isinstance(obj, Mapping) and "tensors" in obj:  # save_update / Update.state_dict
        raw = obj["tensors"]
        if not isinstance(raw, (list, tuple)):
            raise UpdateFileError(f"{name}: 'tensors' must be a list of tensors, got {type(raw).__name__}")
        names = obj.get("names")
        if names is not None and (
            not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)
        ):
            raise UpdateFileError(f"{name}: 'names' must be a list of strings")
        if names is not None and len(names) != len(raw):
            raise UpdateFileError(f"{name}: {len(names)} names for {len(raw)} tensors")
        names = None if names is None else list(names)
        tensors = _as_tensors(list(zip(names or [str(i) for i in range(len(raw))], raw, strict=True)), name)
        changes = obj.get("buffer_changes") or {}
        if not isinstance(changes, Mapping):
            raise UpdateFileError(f"{name}: 'buffer_changes' must be a dict of tensors")
        stored_changes = dict(zip(changes, _as_tensors(list(changes.items()), name), strict=True))
        labels, file_kind = obj.get("labels"), obj.get("kind")
        num_images, num_clients = obj.get("num_images"), obj.get("num_clients") or 1
        recorded += ["num_clients"] if obj.get("num_clients") is not None else []
        meta = obj.get("meta") or {}
    elif isinstance(obj, Mapping):  # name -> tensor (a safetensors or .npz file, or a plain state dict)
        items = [(str(k), v) for k, v in obj.items() if not str(k).startswith(RESERVED)]
        values = _as_tensors(items, name)
        items = [(n, t) for (n, _), t in zip(items, values, strict=True)]
        change_items = [
            (str(k)[len(BUFFER_PREFIX) :], v) for k, v in obj.items() if str(k).startswith(BUFFER_PREFIX)
        ]
        stored_changes = dict(zip([n for n, _ in change_items], _as_tensors(change_items, name), strict=True))
        labels = obj.get(LABELS_KEY)
        if labels is not None and not isinstance(labels, Tensor):
            labels = _as_tensors([(LABELS_KEY, labels)], name)[0]
        order, num_images, num_clients, meta = _description(metadata, name)
        if isinstance(order, list) and sorted(order) == sorted(n for n, _ in items):
            by_name = dict(items)
            items = [(n, by_name[n]) for n in order]  # the parameter order save_update recorded
        names, tensors = [n for n, _ in items], [t for _, t in items]
        file_kind = metadata.get("kind")
        recorded += ["num_clients"] if "num_clients" in metadata else []
    elif isinstance(obj, (list, tuple)):
        tensors, names = _as_tensors([(str(i), t) for i, t in enumerate(obj)], name), None
        _, num_images, num_clients, meta = _description(metadata, name)
        file_kind = metadata.get("kind")
        recorded += ["num_clients"] if "num_clients" in metadata else []
    else:
        raise UpdateFileError(
            f"{name} holds a {type(obj).__name__}; expected a dict of tensors, a list of tensors or a saved update"
        )

    for key, value in (("num_images", num_images), ("num_clients", num_clients)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UpdateFileError(f"{name}: {key} must be a positive integer, got {value!r}")
    if file_kind is not None and file_kind not in KINDS:
        raise UpdateFileError(f"{name}: unknown update kind {file_kind!r} in the file")
    if file_kind is not None:
        recorded.append("kind")
        if kind is not None and kind != file_kind:
            raise UpdateFileError(f"{name} records a {file_kind!r} update, not the {kind!r} asked for")
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise UpdateFileError(f"{name}: labels must be a tensor, got {type(labels).__name__}")
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            raise UpdateFileError(f"{name}: labels must be whole class indices, got {labels.tolist()}")
        labels = labels.long()
        num_images = num_images if num_images is not None else labels.shape[0]

    the_kind = file_kind or kind or default_kind or "gradient"
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    names, tensors, buffers = _split(names, tensors, victim, name)
    buffer_changes = _buffer_changes(buffers, the_kind, victim, meta)
    if victim is not None:
        _check_buffer_shapes(stored_changes, dict(victim.named_buffers()), name)
    both = set(buffer_changes) & set(stored_changes)
    if both:
        raise UpdateFileError(f"{name}: buffers {sorted(both)[:4]} are given twice")
    buffer_changes.update(stored_changes)
    meta["recorded"] = recorded
    update = Update(
        tensors,
        names,
        the_kind,
        labels=labels,
        num_images=num_images,
        num_clients=int(num_clients),
        meta=meta,
        buffer_changes=buffer_changes,
    )
    problem = update_problem(update, victim)
    if problem is not None:
        raise UpdateFileError(f"{name}: {problem}")
    return update


def _description(metadata: dict[str, str], name: str) -> tuple[Any, Any, Any, Any]:
    """Parameter order, number of images and of clients, and meta from a file's string metadata."""
    try:
        order = json.loads(metadata["names"]) if "names" in metadata else None
        num_images = json.loads(metadata.get("num_images", "null"))
        num_clients = json.loads(metadata.get("num_clients", "1")) or 1
        meta = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError as error:
        raise UpdateFileError(f"{name}: malformed metadata: {error}") from error
    return order, num_images, num_clients, meta


def weights_digest(arrays: Sequence[Any]) -> str:
    """A digest of a list of arrays or tensors (dtype, shape and bytes, in order): the identity of the global
    weights an update was computed from (:class:`~lightning_inversion.flower.UpdateRecorder` records it)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, Tensor) else a
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def victim_digests(victim: nn.Module) -> set[str]:
    """The digests of the victim's ``state_dict()`` values and of its parameters alone."""
    return {
        weights_digest(list(victim.state_dict().values())),
        weights_digest([p for p in victim.parameters()]),
    }


def kind_problem(update: Update, victim: nn.Module) -> str | None:
    """Why ``update`` does not look like its kind, measured against the victim's (the global) weights, or ``None``.

    New weights lie next to the global ones (cosine about 1, the same norm); a gradient or a change of weights is
    small and points elsewhere. A ``gradient`` or ``delta`` that looks like new weights, or ``weights`` that look
    like a change, are named.
    """
    params = [p.detach().float().cpu().reshape(-1) for p in victim.parameters()]
    if len(params) != len(update.tensors):
        return None
    theta = torch.cat(params)
    sent = torch.cat([t.detach().float().cpu().reshape(-1) for t in update.tensors])
    norm, sent_norm = float(theta.norm()), float(sent.norm())
    if norm == 0 or sent_norm == 0:
        return None
    cosine = float(sent @ theta) / (norm * sent_norm)
    ratio = sent_norm / norm
    looks_like_weights = cosine > 0.9 and 0.5 < ratio < 2
    if update.kind != "weights" and looks_like_weights:
        return (
            f"it looks like new weights, not a {update.kind!r} (cosine {cosine:.5f} with the global weights, norm "
            f"ratio {ratio:.3f}): set --client.protocol fedavg --client.send weights"
        )
    if update.kind == "weights" and not looks_like_weights:
        return (
            f"it does not look like new weights (cosine {cosine:.3f} with the global weights, norm ratio "
            f"{ratio:.3g}): it is a change or a gradient (--client.send delta, or --client.protocol fedsgd), or "
            "the victim does not hold the global weights the server sent (--model.victim_weights)"
        )
    return None


def as_change(update: Update, victim: nn.Module) -> Update:
    """A ``weights`` update as the change of weights ``θ_K − θ_0`` from the victim's weights (the global ones the
    server sent), kind ``delta``: what the matching cost can see (new weights have a cosine of about 1 with any
    near copy of the global weights). Other kinds are returned as they are."""
    if update.kind != "weights":
        return update
    params = list(victim.parameters())
    tensors = [t - p.detach().to(t) for t, p in zip(update.tensors, params, strict=True)]
    meta = dict(update.meta)
    meta["sent"] = "weights"  # what the client sent; the server subtracted the global weights
    return dataclasses.replace(update, tensors=tensors, kind="delta", meta=meta)
