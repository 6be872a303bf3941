"""Audit a Flower deployment: record the updates a Flower server receives, as files the attack reads.

:class:`UpdateRecorder` wraps any Flower server ``Strategy`` (``flwr.server.strategy``: FedAvg, FedProx, ...) and
does exactly what the wrapped strategy does, while writing, every round, the global weights the server sent and
each client's update as ``.npz`` files (arrays only: they load without pickle)::

    OUTPUT_DIR/round_001/global.npz                    the global weights of round 1 (np.savez(*arrays))
    OUTPUT_DIR/round_001/client_<cid>.npz              what client <cid> sent, with a __meta__ description

An update file records its kind (``weights``: Flower clients send their new weights), the round, the client's
id, ``num_examples`` (as the number of images), a digest of the global weights it was computed from, and the
client's local-training settings when the recorder is told them (``client``). ``invert.py fit --update FILE
--model.victim_weights .../global.npz`` attacks it. Needs ``flwr`` (``pip install 'lightning-inversion[flower]'``);
nothing here imports Lightning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .client import Client
from .update_io import weights_digest

try:
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy import Strategy
except ImportError as error:  # pragma: no cover - the optional dependency is missing
    raise ImportError(
        "lightning_inversion.flower needs Flower: pip install 'lightning-inversion[flower]'"
    ) from error

META_KEY = "__meta__"
FORMAT = "lightning_inversion.update/1"


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


def _safe(cid: str) -> str:
    """A client id as a file name part."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(cid)) or "client"


class UpdateRecorder(Strategy):
    """A Flower strategy that behaves as ``strategy`` and records every update the server receives.

    Args:
        strategy: the Flower server strategy that runs the federation (its results are returned unchanged).
        output_dir: where the rounds' folders are written.
        names: the names of the arrays the clients send (``list(net.state_dict().keys())``); ``None``: by
            position (the attack matches positions against the victim's ``state_dict()`` or parameters).
        kind: what the clients send: ``weights`` (Flower's ``NumPyClient`` default, the new weights), ``delta``
            (the change of weights) or ``gradient`` (FedSGD).
        client: the clients' local training as the server knows it (``protocol``, ``local_lr``,
            ``local_steps``/``local_epochs``, ``local_batch_size``, ``momentum``, ``weight_decay``); recorded in
            every update so that the attack simulates the same. ``None``: the attack's ``--client.*`` options say.
        rounds: the rounds to record (``None``: all).
    """

    def __init__(
        self,
        strategy: Strategy,
        output_dir: str | Path,
        names: Sequence[str] | None = None,
        kind: str = "weights",
        client: Client | None = None,
        rounds: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("weights", "delta", "gradient"):
            raise ValueError(f"kind must be 'weights', 'delta' or 'gradient', got {kind!r}")
        self.strategy = strategy
        self.output_dir = Path(output_dir)
        self.names = None if names is None else [str(n) for n in names]
        self.kind = kind
        self.client = client
        self.rounds = None if rounds is None else {int(r) for r in rounds}
        self.recorded: list[Path] = []  # every update file written, in order
        self._global: dict[int, tuple[Path, str]] = {}

    def __repr__(self) -> str:
        return f"UpdateRecorder({self.strategy!r}, output_dir={str(self.output_dir)!r})"

    def _wanted(self, server_round: int) -> bool:
        return self.rounds is None or server_round in self.rounds

    def _folder(self, server_round: int) -> Path:
        folder = self.output_dir / f"round_{server_round:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _save(self, path: Path, arrays: Sequence[Any], meta: dict | None) -> None:
        arrays = [np.asarray(a) for a in arrays]
        if self.names is not None:
            if len(self.names) != len(arrays):
                raise ValueError(f"{len(arrays)} arrays received but {len(self.names)} names given")
            content = dict(zip(self.names, arrays, strict=True))
        else:
            content = {f"arr_{i}": a for i, a in enumerate(arrays)}
        if meta is not None:
            content[META_KEY] = np.array(json.dumps(meta))
        with open(path, "wb") as f:
            np.savez(f, **content)

    # --- the strategy: the wrapped one's answers, with the updates written down ------------------------------
    def initialize_parameters(self, client_manager):
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters, client_manager):
        if self._wanted(server_round):
            arrays = parameters_to_ndarrays(parameters)
            path = self._folder(server_round) / "global.npz"
            self._save(path, arrays, None)
            self._global[server_round] = (path, weights_digest(arrays))
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results, failures):
        if self._wanted(server_round):
            global_path, digest = self._global.get(server_round, (None, None))
            for proxy, fit_res in results:
                cid = str(getattr(proxy, "cid", "unknown"))
                meta: dict[str, Any] = {
                    "round": server_round,
                    "client_id": cid,
                    "num_examples": int(fit_res.num_examples),
                    "metrics": _plain(dict(fit_res.metrics or {})),
                    "global_weights": None if global_path is None else global_path.name,
                    "global_digest": digest,
                    "source": "flower",
                }
                if self.client is not None:
                    c = self.client
                    meta |= {
                        "protocol": c.protocol,
                        "local_lr": c.local_lr,
                        "local_steps": c.steps_for(int(fit_res.num_examples)),
                        "local_batch_size": c.local_batch_size,
                        "momentum": c.momentum,
                        "weight_decay": c.weight_decay,
                    }
                    if c.train_mode_option is not None:
                        meta["train_mode"] = c.train_mode_option
                description = {
                    "format": FORMAT,
                    "kind": self.kind,
                    "num_images": int(fit_res.num_examples) if fit_res.num_examples >= 1 else None,
                    "meta": meta,
                }
                if self.names is not None:
                    description["names"] = self.names
                path = self._folder(server_round) / f"client_{_safe(cid)}.npz"
                self._save(path, parameters_to_ndarrays(fit_res.parameters), description)
                self.recorded.append(path)
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters):
        return self.strategy.evaluate(server_round, parameters)
