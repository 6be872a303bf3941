"""The simulated federated-learning client: how private images become the update the server sees.

The same functional code serves the honest client (which computes the shared update once) and the attacker
(which differentiates it with respect to dummy images), so the victim's loss is exactly the attacker's loss.
It is written with ``torch.func.functional_call`` and ``torch.func.grad``, so it works for any ``nn.Module``
(BatchNorm included) and composes with ``vmap`` over restarts. Nothing here imports Lightning.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from .defenses import DPSGD, Defense, private_generator
from .errors import InputError

UpdateKind = Literal["gradient", "delta", "weights"]

#: What :meth:`Client.simulate` hands image priors that ask for it (see :mod:`lightning_inversion.priors`).
BATCHNORM_STATISTICS = "batchnorm_statistics"


@dataclass
class Update:
    """What the server receives: one tensor per victim parameter, in ``victim.parameters()`` order.

    Attributes:
        tensors: the gradient (FedSGD), the weight change ``θ_K − θ_0`` or the new weights ``θ_K`` (FedAvg).
        names: the parameter names, as in ``victim.named_parameters()``.
        kind: ``gradient``, ``delta`` or ``weights``.
        labels: labels the attacker knows (shared by the client, or recovered), ``(B,)``; ``None`` if unknown.
        num_images: how many images the client used (the batch size B), when known.
        num_clients: how many clients were averaged into this update (1 without aggregation).
        meta: what else is known about how the update was made (client options, its source file, ...).
        buffer_changes: how the client's local training changed the victim's buffers (BatchNorm running
            statistics and step counters), ``new − global`` by name as in ``victim.named_buffers()``; empty when
            the client did not send its buffers. Never parameters: the objective matches ``tensors`` only.
    """

    tensors: list[Tensor]
    names: list[str]
    kind: UpdateKind = "gradient"
    labels: Tensor | None = None
    num_images: int | None = None
    num_clients: int = 1
    meta: dict = field(default_factory=dict)
    buffer_changes: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Update:
        return Update(
            [t.to(device) for t in self.tensors],
            list(self.names),
            self.kind,
            None if self.labels is None else self.labels.to(device),
            self.num_images,
            self.num_clients,
            dict(self.meta),
            {n: b.to(device) for n, b in self.buffer_changes.items()},
        )

    @property
    def buffers_moved(self) -> bool:
        """Whether local training changed a buffer's value (step counters aside): the client trained in train
        mode (BatchNorm updated its running statistics)."""
        return any(b.is_floating_point() and bool(b.any()) for b in self.buffer_changes.values())

    def state_dict(self) -> dict:
        """Plain tensors and Python values only, so it can be saved in a checkpoint and loaded without pickles."""
        return {
            "tensors": [t.detach().cpu() for t in self.tensors],
            "names": list(self.names),
            "kind": self.kind,
            "labels": None if self.labels is None else self.labels.detach().cpu(),
            "num_images": self.num_images,
            "num_clients": self.num_clients,
            "meta": dict(self.meta),
            "buffer_changes": {n: b.detach().cpu() for n, b in self.buffer_changes.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Update:
        update = cls(**state)
        overlap = set(update.names) & set(update.buffer_changes)
        if overlap:
            raise ValueError(f"{sorted(overlap)[:4]} are named both as parameters and as buffers")
        return update


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy for hard labels ``(B,)`` or soft label logits ``(B, K)`` (DLG: softmax targets)."""
    if labels.is_floating_point():
        return -(labels.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    return F.cross_entropy(logits, labels)


class Client:
    """The honest client of the threat model.

    Args:
        protocol: ``fedsgd`` sends one gradient of the mean cross-entropy over the whole batch; ``fedavg`` runs
            local SGD steps and sends the resulting change of weights.
        local_steps: FedAvg: number of local SGD steps K.
        local_lr: FedAvg: the local learning rate η.
        local_batch_size: FedAvg: minibatch size b; step i uses minibatch ``i mod ceil(B / b)``. ``None`` uses
            the whole batch at every step.
        local_epochs: FedAvg: if set, overrides ``local_steps`` with ``local_epochs · ceil(B / b)``.
        send: FedAvg: send the change ``θ_K − θ_0`` (``delta``) or the new weights ``θ_K`` (``weights``).
        train_mode: training mode (BatchNorm on batch statistics), as Flower's ``net.train()``. ``None``: the
            update's (train when its buffers moved), else eval mode.
        num_clients: secure aggregation: the private batch is split into this many equal client batches, each
            client computes its own update, and the server sees only their average.
        momentum: FedAvg: local SGD momentum (``torch.optim.SGD``'s; new each round).
        weight_decay: FedAvg: local SGD weight decay (``torch.optim.SGD``'s).
        defenses: applied to the update in order (``lightning_inversion.defenses``); the attacker knows their
            rules, never their noise.
    """

    def __init__(
        self,
        protocol: Literal["fedsgd", "fedavg"] = "fedsgd",
        local_steps: PositiveInt = 5,
        local_lr: PositiveFloat = 1e-4,
        local_batch_size: PositiveInt | None = None,
        local_epochs: PositiveInt | None = None,
        send: Literal["delta", "weights"] = "delta",
        train_mode: bool | None = None,
        num_clients: PositiveInt = 1,
        momentum: NonNegativeFloat = 0.0,
        weight_decay: NonNegativeFloat = 0.0,
        defenses: list[Defense] | None = None,
    ) -> None:
        # The command line refuses these through the types; from Python the same rules hold here.
        for name, value in (
            ("local_steps", local_steps),
            ("local_batch_size", local_batch_size),
            ("local_epochs", local_epochs),
            ("num_clients", num_clients),
        ):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise InputError(f"client option {name} must be a whole number >= 1, got {value!r}")
        if not (isinstance(local_lr, (int, float)) and math.isfinite(local_lr) and local_lr > 0):
            raise InputError(f"client option local_lr must be a finite number > 0, got {local_lr!r}")
        for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InputError(f"client option {name} must be a finite number >= 0, got {value!r}")
        if train_mode is not None and not isinstance(train_mode, bool):
            raise InputError(f"client option train_mode must be true, false or null, got {train_mode!r}")
        if protocol not in ("fedsgd", "fedavg"):
            raise InputError(f"client option protocol must be 'fedsgd' or 'fedavg', got {protocol!r}")
        if send not in ("delta", "weights"):
            raise InputError(f"client option send must be 'delta' or 'weights', got {send!r}")
        # Plain Python values (not the parser's PositiveInt), so that checkpoints load with weights_only=True.
        self.protocol = protocol
        self.local_steps = int(local_steps)
        self.local_lr = float(local_lr)
        self.local_batch_size = None if local_batch_size is None else int(local_batch_size)
        self.local_epochs = None if local_epochs is None else int(local_epochs)
        self.send = send
        self.train_mode_option = train_mode  # None: follows the update
        self.train_mode = bool(train_mode)
        self.num_clients = int(num_clients)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.defenses = _checked_defenses(defenses)

    @property
    def kind(self) -> UpdateKind:
        return "gradient" if self.protocol == "fedsgd" else self.send

    def steps_for(self, num_images: int) -> int:
        """The number of local steps for a batch of ``num_images``."""
        if self.local_epochs is None:
            return self.local_steps
        return self.local_epochs * math.ceil(num_images / (self.local_batch_size or num_images))

    def split(self, num_images: int) -> int:
        """Images per client under aggregation; the batch must split evenly.

        Raises:
            InputError: ``num_images`` is not a multiple of ``num_clients``.
        """
        if num_images % self.num_clients:
            raise InputError(
                f"client option num_clients={self.num_clients}: {num_images} images do not split evenly over "
                f"{self.num_clients} clients (every client holds the same number of images)"
            )
        return num_images // self.num_clients

    def options(self) -> dict:
        """The ``__init__`` arguments of this client."""
        options = {name: getattr(self, name) for name in _CLIENT_DEFAULTS}
        options["train_mode"] = self.train_mode_option
        return options

    def matching(
        self, update: Update, source: str = "the update", prefix: str = "client option ", adopt: bool = True
    ) -> Client:
        """This client with the options ``update`` records about how it was made.

        An update describes itself when :meth:`update` made it or
        :func:`~lightning_inversion.update_io.save_update` wrote it: its kind (FedSGD gradient, FedAvg ``delta``
        or ``weights``), the number of clients averaged, the mode, and for FedAvg the local steps, learning rate
        and minibatch size. That description is the truth: an option left at its default takes the recorded
        value, and an option set to something else is refused.

        Args:
            update: the update to attack.
            source: the update's name in messages (its file).
            prefix: how messages name an option (``--client.`` on the command line).
            adopt: take recorded values for options left at their defaults; ``False`` refuses every difference.

        Raises:
            InputError: an option that is not the default (any option, without ``adopt``) contradicts the update's
                description.
        """
        recorded = recorded_options(update)
        mine = self.options()
        adopted, effective = dict(mine), dict(mine)
        effective["train_mode"] = self.train_mode  # what this client simulates (None: eval mode)
        if "local_steps" in recorded and self.local_epochs is not None:
            steps = self.steps_for(update.num_images or 1)
            if steps != recorded["local_steps"]:
                raise InputError(
                    f"{prefix}local_epochs {self.local_epochs} means {steps} local steps, but {source} records "
                    f"local_steps {recorded['local_steps']}: drop the option"
                )
            effective["local_steps"] = steps  # what local_epochs means for this batch
        for name, value in recorded.items():
            if _same_option(effective[name], value):
                continue
            if not adopt or not _same_option(mine[name], _CLIENT_DEFAULTS[name]):
                what = f" (a {update.kind!r} update)" if name in ("protocol", "send") else ""
                if name == "train_mode" and update.buffers_moved and "train_mode" not in update.meta:
                    what = " (its BatchNorm running statistics moved: the client trained in train mode)"
                raise InputError(
                    f"{prefix}{name} {mine[name]!r} contradicts {source}, which records {name} {value!r}{what}: "
                    f"drop the option or set it to {value!r}"
                )
            adopted[name] = value
        return self if adopted == mine else Client(**adopted)

    def update(self, victim: nn.Module, images: Tensor, labels: Tensor) -> Update:
        """Compute the update this client shares for its private ``images`` (B, C, H, W) and ``labels`` (B,).

        With defenses, this is the honest face: their noise is drawn from generators private to this call.
        """
        names = [n for n, _ in victim.named_parameters()]
        params = {n: p.detach() for n, p in victim.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in victim.named_buffers()}
        modes = [(m, m.training) for m in victim.modules()]
        meta: dict = {}
        try:
            with torch.no_grad():
                if self.defenses:
                    tensors = self._defended_update(victim, params, buffers, images, labels, meta)
                else:
                    tensors = self.simulate(victim, params, buffers, images, labels)
        finally:  # the caller's model keeps its modes (simulate sets the client's)
            for m, mode in modes:
                m.training = mode
        start = dict(victim.named_buffers())
        return Update(
            [t.detach() for t in tensors],
            names,
            self.kind,
            labels=labels.detach().clone(),
            num_images=images.shape[0],
            num_clients=self.num_clients,
            meta={
                "protocol": self.protocol,
                "local_lr": self.local_lr,
                "local_steps": self.steps_for(len(images)),
                "local_batch_size": self.local_batch_size,
                "train_mode": self.train_mode,
                "momentum": self.momentum,
                "weight_decay": self.weight_decay,
                "image_shape": list(images.shape[1:]),
                **meta,
            },
            # Under aggregation the server sees no single client's buffers.
            buffer_changes={n: b - start[n] for n, b in buffers.items()} if self.num_clients == 1 else {},
        )

    @property
    def dpsgd(self) -> DPSGD | None:
        """The client's DP-SGD defense, if any (it acts inside the local steps, before the other defenses)."""
        return next((d for d in self.defenses if isinstance(d, DPSGD)), None)

    def privacy(self, num_images: int) -> dict | None:
        """The DP guarantee of one update of ``num_images`` images (ε from Opacus's accountant), or ``None``."""
        dp = self.dpsgd
        if dp is None:
            return None
        per_client = self.split(num_images)
        if self.protocol == "fedsgd":
            return dp.privacy(1.0, 1)
        batch = min(self.local_batch_size or per_client, per_client)
        return dp.privacy(batch / per_client, self.steps_for(per_client))

    def _defended_update(
        self,
        victim: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        images: Tensor,
        labels: Tensor,
        meta: dict,
    ) -> list[Tensor]:
        """The honest face of the defenses: each client's update, defended with private draws, then averaged."""
        dp = self.dpsgd
        self._check_defenses(victim)
        # One private generator per defense that draws, for this call only: never stored, never returned.
        generators = {id(d): private_generator(d.seed, images.device) for d in self.defenses if d.draws}
        victim.train(self.train_mode)
        per_client = self.split(images.shape[0])
        updates = []
        for x, y in zip(images.split(per_client), labels.split(per_client), strict=True):
            if dp is None:
                written_out = not self.train_mode and _has_batchnorm(victim)
                with EvalBatchNormAsAffine() if written_out else contextlib.nullcontext():
                    tensors = self._local_update(victim, params, buffers, x, y, None, None)
            else:
                tensors = self._opacus_update(victim, params, buffers, x, y, dp, generators.get(id(dp)))
            for defense in self.defenses:
                if defense is not dp:
                    tensors = defense.defend(tensors, generators.get(id(defense)))
            updates.append(tensors)
        meta["defenses"] = [d.describe() for d in self.defenses]
        privacy = self.privacy(images.shape[0])
        if privacy is not None:
            meta["privacy"] = privacy
        return [torch.stack(ts).mean(0) for ts in zip(*updates, strict=True)]

    def _opacus_update(
        self,
        victim: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        images: Tensor,
        labels: Tensor,
        dp: DPSGD,
        generator: torch.Generator | None,
    ) -> list[Tensor]:
        """One client's DP-SGD update through Opacus: ``GradSampleModule`` and ``DPOptimizer`` over the client's
        local SGD (weight decay and momentum act on the private gradient, as ``torch.optim.SGD`` does)."""
        from .defenses import _opacus

        GradSampleModule = _opacus("opacus", "GradSampleModule")
        model = copy.deepcopy(victim)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
                p.requires_grad_(True)
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        if not self.train_mode:  # training mode with BatchNorm is refused by _check_defenses
            _constant_statistics(model)
        # Opacus records activations only of modules in training mode: the layers with parameters are put in it
        # (eval-mode BatchNorm is now a constant map), the others (dropout) keep the client's mode.
        for module in model.modules():
            module.training = self.train_mode or any(True for _ in module.parameters(recurse=False))
        sampled = GradSampleModule(model)
        num_images = images.shape[0]
        fedsgd = self.protocol == "fedsgd"
        b = num_images if fedsgd else min(self.local_batch_size or num_images, num_images)
        local = dict(lr=self.local_lr, momentum=self.momentum, weight_decay=self.weight_decay)
        optimizer = dp.optimizer(
            torch.optim.SGD(model.parameters(), **({"lr": 1.0} if fedsgd else local)), b, generator
        )
        start = [p.detach().clone() for p in model.parameters()]
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                # Opacus's hooks on the first layer fire on outputs (the images need no gradient): as meant.
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                if fedsgd:
                    optimizer.zero_grad()
                    cross_entropy(sampled(images), labels).backward()
                    optimizer.pre_step()  # clip, sum, noise, divide: p.grad is the DP gradient
                    return [p.grad.detach().clone() for p in model.parameters()]
                num_batches = math.ceil(num_images / b)
                for step in range(self.steps_for(num_images)):
                    i = step % num_batches
                    optimizer.zero_grad()
                    cross_entropy(
                        sampled(images[i * b : (i + 1) * b]), labels[i * b : (i + 1) * b]
                    ).backward()
                    optimizer.step()
        finally:
            sampled._close()
        weights = [p.detach().clone() for p in model.parameters()]
        if self.send == "delta":
            return [w - s for w, s in zip(weights, start, strict=True)]
        return weights

    def _check_defenses(self, victim: nn.Module) -> None:
        if self.dpsgd is not None and self.train_mode and _has_batchnorm(victim):
            raise InputError(
                "the DPSGD defense needs per-example gradients, which BatchNorm in training mode does not have "
                "(it mixes the examples of a batch): set client.train_mode false or use a victim without BatchNorm"
            )

    def simulate(
        self,
        victim: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        images: Tensor,
        labels: Tensor,
        only: Sequence[int] | None = None,
        seen: dict[str, dict] | None = None,
    ) -> list[Tensor]:
        """The update as a differentiable function of ``images`` (and soft ``labels``).

        Args:
            victim: the module whose architecture is used (its own parameters are ignored: ``params`` are used).
            params: parameter tensors by name, in ``named_parameters()`` order.
            buffers: buffer tensors by name (BatchNorm statistics); updated in place in train mode.
            images: ``(B, C, H, W)`` in the victim's normalised input space.
            labels: ``(B,)`` class indices, or ``(B, K)`` soft-label logits.
            only: indices of the parameters whose update is wanted (all if ``None``).
            seen: filled with what the client's forward passes saw, for image priors (see
                :mod:`lightning_inversion.priors`): pass ``{"batchnorm_statistics": {}}`` to get, per BatchNorm
                layer name, the ``(mean, var)`` of its input (``var`` biased, over batch and spatial axes),
                differentiable in ``images``; over several local steps, the steps' statistics averaged as the
                running statistics average them. Under aggregation, over all clients' images. ``None``: nothing
                recorded, at no cost.

        Returns:
            The update tensors, one per requested parameter (the average over clients under aggregation).
        """
        victim.train(self.train_mode)
        written_out = not self.train_mode and _has_batchnorm(victim)
        with EvalBatchNormAsAffine() if written_out else contextlib.nullcontext():
            if self.num_clients > 1:
                per_client = self.split(images.shape[0])
                each = [None if seen is None else {k: {} for k in seen} for _ in range(self.num_clients)]
                updates = [
                    self._simulate_one(victim, params, buffers, x, y, only, s)
                    for x, y, s in zip(images.split(per_client), labels.split(per_client), each, strict=True)
                ]
                if seen is not None and BATCHNORM_STATISTICS in seen:
                    seen[BATCHNORM_STATISTICS].update(_pooled([s[BATCHNORM_STATISTICS] for s in each]))
                return [torch.stack(ts).mean(0) for ts in zip(*updates, strict=True)]
            return self._simulate_one(victim, params, buffers, images, labels, only, seen)

    def _simulate_one(
        self,
        victim: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        images: Tensor,
        labels: Tensor,
        only: Sequence[int] | None,
        seen: dict[str, dict] | None = None,
    ) -> list[Tensor]:
        if not self.defenses:
            return self._local_update(victim, params, buffers, images, labels, only, None, seen)
        # The attacker's face of the defenses: their rules, no draws. Clipping and pruning look at every tensor,
        # so the whole update is computed before the compared tensors are picked.
        self._check_defenses(victim)
        dp = self.dpsgd
        tensors = self._local_update(victim, params, buffers, images, labels, None, dp, seen)
        for defense in self.defenses:
            if defense is not dp:
                tensors = defense.simulate(tensors)
        return tensors if only is None else [tensors[i] for i in only]

    def _local_update(
        self,
        victim: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        images: Tensor,
        labels: Tensor,
        only: Sequence[int] | None,
        dp: DPSGD | None,
        seen: dict[str, dict] | None = None,
    ) -> list[Tensor]:
        """One client's undefended update, or with ``dp`` its DP-SGD update without the noise (per-example
        gradients by ``vmap``, clipped as Opacus clips them)."""
        names = list(params)
        wanted = range(len(names)) if only is None else only
        statistics = None if seen is None else seen.get(BATCHNORM_STATISTICS)

        def loss_at(
            p: dict[str, Tensor], x: Tensor, y: Tensor, b: dict[str, Tensor], record: bool
        ) -> tuple[Tensor, dict]:
            found: dict = {}
            with _batchnorm_inputs(victim, found if record else None):
                return cross_entropy(functional_call(victim, (p, b), (x,)), y), found

        def private_gradient(p: dict[str, Tensor], x: Tensor, y: Tensor, expected: int) -> dict[str, Tensor]:
            """DP-SGD's gradient without its noise: per-example gradients, clipped, summed, over ``expected``."""

            def loss_of_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
                return loss_at(p, xi[None], yi[None], buffers, False)[0]

            per_example = torch.func.vmap(torch.func.grad(loss_of_one), in_dims=(None, 0, 0))(p, x, y)
            clipped = dp.clip_and_average([per_example[n] for n in names], expected)  # (B, *shape) each
            return dict(zip(names, clipped, strict=True))

        if self.protocol == "fedsgd":
            if dp is not None:
                if statistics is not None:  # what the batch's forward pass shows the priors
                    statistics.update(loss_at(params, images, labels, buffers, True)[1])
                grads = private_gradient(params, images, labels, images.shape[0])
                return [grads[names[i]] for i in wanted]
            # Differentiate only the tensors the attack compares: the rest are constants of this function.
            grad_names = [names[i] for i in wanted]
            chosen = set(grad_names)
            fixed = {n: params[n] for n in names if n not in chosen}
            if _plain_autograd_applies(images, labels, [params[n] for n in grad_names]):
                selected = {n: params[n] for n in grad_names}
                with _batchnorm_inputs(victim, statistics):
                    return _autograd_update(victim, fixed, selected, buffers, images, labels)

            # The buffers are an argument, not captured: training-mode BatchNorm updates them in place, which
            # torch.func allows only on the transformed function's inputs. What the pass saw leaves the
            # transform as its auxiliary output.
            def loss_of(selected: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[Tensor, dict]:
                found: dict = {}
                with _batchnorm_inputs(victim, None if statistics is None else found):
                    logits = functional_call(victim, ({**fixed, **selected}, b), (images,))
                return cross_entropy(logits, labels), found

            grads, found = torch.func.grad(loss_of, has_aux=True)({n: params[n] for n in grad_names}, buffers)
            if statistics is not None:
                statistics.update(found)
            return [grads[n] for n in grad_names]

        num_images = images.shape[0]
        b = self.local_batch_size or num_images
        num_batches = math.ceil(num_images / b)
        current = dict(params)
        change = {n: torch.zeros_like(p) for n, p in params.items()}
        velocity: dict[str, Tensor] | None = None  # torch.optim.SGD's momentum buffer
        record = statistics is not None
        per_step: list[dict] = []  # what each step's forward pass saw, for the priors
        for step in range(self.steps_for(num_images)):
            i = step % num_batches
            x, y = images[i * b : (i + 1) * b], labels[i * b : (i + 1) * b]
            if dp is None:
                grads, found = torch.func.grad(loss_at, has_aux=True)(current, x, y, buffers, record)
            else:
                grads = private_gradient(current, x, y, min(b, num_images))
                found = loss_at(current, x, y, buffers, True)[1] if record else {}
            if record:
                per_step.append(found)
            if self.weight_decay:
                grads = {n: grads[n] + self.weight_decay * current[n] for n in names}
            if self.momentum:
                velocity = (
                    grads if velocity is None else {n: self.momentum * velocity[n] + grads[n] for n in names}
                )
                grads = velocity
            change = {n: change[n] - self.local_lr * grads[n] for n in names}
            current = {n: params[n] + change[n] for n in names}
        if record:
            statistics.update(_as_running_statistics_absorb(victim, per_step))
        out = change if self.send == "delta" else current
        return [out[names[i]] for i in wanted]


_CLIENT_DEFAULTS = {
    name: p.default for name, p in inspect.signature(Client.__init__).parameters.items() if name != "self"
}


def _checked_defenses(defenses) -> list[Defense]:
    """The client's defenses as a list; at most one DP-SGD."""
    if defenses is None:
        return []
    if not isinstance(defenses, (list, tuple)) or not all(isinstance(d, Defense) for d in defenses):
        raise InputError(f"client option defenses must be a list of defenses, got {defenses!r}")
    if sum(isinstance(d, DPSGD) for d in defenses) > 1:
        raise InputError("client option defenses: at most one DPSGD (it acts inside the local steps)")
    return list(defenses)


def _same_option(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def recorded_options(update: Update) -> dict:
    """The :class:`Client` options an update records about how it was made (see :meth:`Client.matching`).

    An update read from a file lists in ``meta["recorded"]`` what the file itself said (``kind``,
    ``num_clients``); any other update is taken at its word.
    """
    recorded = update.meta.get("recorded", ("kind", "num_clients"))
    options: dict = {}
    if "kind" in recorded:
        options["protocol"] = "fedsgd" if update.kind == "gradient" else "fedavg"
        if update.kind != "gradient":
            options["send"] = update.kind
    if "num_clients" in recorded:
        options["num_clients"] = int(update.num_clients)
    meta = update.meta
    if isinstance(meta.get("train_mode"), bool):
        options["train_mode"] = meta["train_mode"]
    elif update.buffers_moved:  # BatchNorm's running statistics move only in training mode
        options["train_mode"] = True
    if options.get("protocol") == "fedavg" and meta.get("protocol") == "fedavg":
        for name in ("momentum", "weight_decay"):
            if isinstance(meta.get(name), (int, float)) and not isinstance(meta[name], bool):
                options[name] = float(meta[name])
        if _whole(meta.get("local_steps")):
            options["local_steps"] = int(meta["local_steps"])
        if isinstance(meta.get("local_lr"), (int, float)) and not isinstance(meta["local_lr"], bool):
            options["local_lr"] = float(meta["local_lr"])
        if "local_batch_size" in meta and (
            meta["local_batch_size"] is None or _whole(meta["local_batch_size"])
        ):
            options["local_batch_size"] = meta["local_batch_size"]
    return options


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def update_problem(update: Update, victim: nn.Module | None = None) -> str | None:
    """Why ``update`` cannot be attacked, or ``None``: NaN or infinite values, no change at all, or labels that
    are not class indices.

    An all-zero gradient (or a FedAvg update that changes no weight) carries no information about the images:
    every reconstruction would be noise. ``weights`` are compared with the ``victim``'s parameters when given.
    """
    for name, tensor in zip(update.names, update.tensors, strict=False):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"tensor {name!r} holds NaN or infinite values"
    changes = update.tensors
    if update.kind == "weights":
        params = list(victim.parameters()) if victim is not None else []
        if len(params) != len(changes) or any(
            p.shape != t.shape for p, t in zip(params, changes, strict=False)
        ):
            changes = []  # nothing to compare with
        else:
            changes = [t - p.detach().to(t) for t, p in zip(changes, params, strict=True)]
    if changes and not any(bool(t.any()) for t in changes):
        what = "new weight equals the victim's" if update.kind == "weights" else "tensor is zero"
        return f"every {what}: the update carries no information about the images"
    labels = update.labels
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            return f"labels must be a 1-d tensor of class indices, got {labels!r}"
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            return f"labels must be whole class indices, got {labels.tolist()}"
        if bool((labels < 0).any()):
            return f"labels must be class indices >= 0, got {labels.tolist()}"
    return None


@contextlib.contextmanager
def _batchnorm_inputs(victim: nn.Module, into: dict | None):
    """Record into ``into``, per BatchNorm layer name, the ``(mean, biased var)`` of the layer's first input over
    its batch and spatial axes (``None``: record nothing, register nothing)."""
    if into is None:
        yield
        return

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if name not in into:
                x = args[0].float()
                axes = [0, *range(2, x.dim())]
                into[name] = (x.mean(axes), x.var(axes, correction=0))

        return record

    handles = [
        module.register_forward_pre_hook(hook(name))
        for name, module in victim.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pooled(per_client: list[dict[str, tuple[Tensor, Tensor]]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean and biased variance over equal-sized client batches, from each batch's own."""
    pooled = {}
    for name in per_client[0]:
        means = torch.stack([s[name][0] for s in per_client])
        squares = torch.stack([s[name][1] + s[name][0] ** 2 for s in per_client])
        mean = means.mean(0)
        pooled[name] = (mean, squares.mean(0) - mean**2)
    return pooled


def _as_running_statistics_absorb(
    victim: nn.Module, per_step: list[dict[str, tuple[Tensor, Tensor]]]
) -> dict[str, tuple[Tensor, Tensor]]:
    """The statistics of K local steps' batches, ``(mean, biased var)`` per BatchNorm layer, averaged with the
    weights the layer's running statistics give them: ``m (1 − m)^(K−1−k)`` for step k with momentum ``m``, equal
    weights for a cumulative average (``momentum=None``). What :class:`~lightning_inversion.buffers.
    RecoveredStatistics` solves from the moved buffers is this average of the private batches' statistics; one
    step's statistics are returned as they are."""
    if len(per_step) == 1:
        return per_step[0]
    momenta = {
        name: m.momentum
        for name, m in victim.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    out = {}
    for name in per_step[0]:
        m, k = momenta.get(name), len(per_step)
        weights = [1.0] * k if m is None else [m * (1 - m) ** (k - 1 - i) for i in range(k)]
        total = sum(weights)
        out[name] = tuple(
            sum(w / total * s[name][j] for w, s in zip(weights, per_step, strict=True)) for j in (0, 1)
        )
    return out


def _has_batchnorm(victim: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in victim.modules())


def affine_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor | None:
    """Eval-mode batch norm written as the per-channel affine map it is, ``x · s + c``; ``None`` where it is not.

    With running statistics and ``training=False``, ``F.batch_norm`` computes ``x · s + c`` with
    ``s = w / sqrt(var + eps)`` and ``c = b − mean · s``, in the statistics' precision; a half-precision input is
    computed in that precision and the output rounded to the input's, as the fused kernel does. Returns ``None`` in
    training mode or without running statistics (batch statistics are not an affine map).
    """
    if training or running_mean is None or running_var is None:
        return None
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (input.dim() - 2)
    scale, shift = scale.reshape(shape), shift.reshape(shape)
    if input.dtype == scale.dtype:
        return torch.addcmul(shift, input, scale)
    # Half-precision input (mixed precision): compute in the statistics' precision and round once, as the fused
    # kernel does, rather than rounding s and c to half precision first.
    return torch.addcmul(shift, input.to(scale.dtype), scale).to(input.dtype)


class EvalBatchNormAsAffine(TorchFunctionMode):
    """Within this mode, eval-mode ``F.batch_norm`` runs as :func:`affine_batch_norm`: same values, cheaper to
    differentiate twice.

    The attack differentiates the client's gradient, so it runs the victim's double backward. PyTorch's double
    backward of the fused batch norm (``batchnorm_double_backward``) is written for training mode and runs dozens
    of operations per layer even in eval mode. Written out as a product and a sum, autograd needs a few. ResNet-18
    with 8 restarts: 10,865 → 6,470 operations per attack step, the same cost and gradient to float rounding
    (``benchmarks/step_ops.py``). On a GPU, where such a step is bound by kernel launches, fewer operations is
    what counts. BatchNorm in training mode (``Client(train_mode=True)``) keeps the fused op.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = affine_batch_norm(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class _ConstantStatisticsBatchNorm(nn.Module):
    """Eval-mode BatchNorm with its running statistics held as constants, not buffers: the same map, and a layer
    Opacus accepts (it refuses every layer with buffers; in eval mode the statistics are no one's data)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.mean, self.var = bn.running_mean.detach().clone(), bn.running_var.detach().clone()
        self.eps = bn.eps

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)


def _constant_statistics(model: nn.Module) -> None:
    """Replace every eval-mode BatchNorm of ``model`` (in place) by :class:`_ConstantStatisticsBatchNorm`;
    parameter names and order stay."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.running_mean is not None:
            setattr(model, name, _ConstantStatisticsBatchNorm(child))
        else:
            _constant_statistics(child)


def _plain_autograd_applies(images: Tensor, labels: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether the FedSGD gradient may use ``torch.autograd.grad`` instead of ``torch.func.grad``.

    Both give the same tensors; reverse-mode autograd skips functorch's per-operation wrapping, which costs a few
    milliseconds per attack step on small victims. It applies outside ``vmap``/``grad`` transforms (one restart)
    and when no parameter is itself differentiated by the caller.
    """
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if is_wrapped is None or is_wrapped(images) or is_wrapped(labels):
        return False
    return not any(p.requires_grad for p in params)


def _autograd_update(
    victim: nn.Module,
    fixed: dict[str, Tensor],
    selected: dict[str, Tensor],
    buffers: dict[str, Tensor],
    images: Tensor,
    labels: Tensor,
) -> list[Tensor]:
    """The gradient of the client's loss for the ``selected`` parameters, differentiable in the images."""
    differentiable = torch.is_grad_enabled() and (images.requires_grad or labels.requires_grad)
    leaves = {n: p.detach().requires_grad_() for n, p in selected.items()}
    with torch.enable_grad():
        logits = functional_call(victim, ({**fixed, **leaves}, buffers), (images,))
        loss = cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=differentiable)
    return list(grads)
