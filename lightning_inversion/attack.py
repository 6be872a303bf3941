"""The attack: gradient inversion as a LightningModule whose parameters are the dummy images.

Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients — How easy is it to break privacy in federated
learning?", NeurIPS 2020. The training step is the gradient-matching objective plus image priors (cosine + total
variation by default), optimised with signed Adam under a box constraint, from several random restarts at once.
The parts, each chosen in YAML by ``class_path`` and free of Lightning: the victim and target checks
(:mod:`.targets`), the client's pass (:mod:`.client`), the objective (:mod:`.objectives`), the priors
(:mod:`.priors`), the label strategy (:mod:`.labels`) and the restart bank (:mod:`.restarts`). This module holds
the dummy images, the step, the sign and the box, and what a checkpoint saves.

Layout of the state:
    dummy_images  (R, B, C, H, W)  nn.Parameter, normalised input space of the victim
    dummy_labels  (R, B, K)        nn.Parameter, DLG soft-label logits (:class:`~.labels.SoftLabels` only)
    target_labels (B,)             buffer, the labels the attacker knows or recovered
    restart_steps (R,)             buffer, optimisation steps each restart ran (a restart with 0 never wins)

The update the attack matches (the target gradient) is set with :meth:`GradientInversion.set_target` and saved in
every checkpoint, so resuming never needs the private data. The module never sees ground truth.

What the Trainer adds:
    several devices  restarts are split over ranks (``strategy="ddp"``, any ``num_nodes``): every rank holds all R
                     restarts but puts only its slice into the loss, scaled by the world size, so DDP's gradient
                     average hands each slice the gradient of the one rank that computed it and the restarts stay
                     independent; the best restart is chosen over all ranks. Each rank runs the victim on its
                     slice of restarts at once, which rounds differently from one process running all of them
                     (see "Batched restarts" below): the images equal a one-device run's over the first steps and
                     drift apart after that, with the same quality in distribution.
    mixed precision  ``bf16-mixed``/``16-mixed`` run the victim's passes in half precision; the dummy images, their
                     gradients (sign step, box) and the matching objective stay in fp32. True half precision
                     (``bf16-true``, ``16-true``) is refused: it rounds the cosine loss to zero.
    checkpoints      the dummy images, optimiser and scheduler state, step, restart counters, torch RNG state,
                     the target update and what identifies the run (:meth:`GradientInversion.run_identity`);
                     ``fit(ckpt_path=...)`` continues bit-identically. The learning-rate
                     milestones are those of the checkpointed run (the scheduler state wins over a new max_steps).
Batched restarts equal separate runs over the first steps, not after: see :mod:`.restarts`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from .client import Client, Update
from .errors import InputError
from .images import IMAGENET_MEAN, IMAGENET_STD, box_bounds, denormalize, median_filter3x3, project_box
from .labels import LABEL_STRATEGIES, LabelStrategy
from .notices import check_precision
from .objectives import OBJECTIVES, Cost, GradientMatching, MatchingObjective, decay_milestones
from .parts import describe, describe_factory
from .priors import ImagePrior, TotalVariation
from .restarts import (
    SELECTIONS,
    Init,
    Reconstruction,
    RestartSelection,
    batched_client_pass,
    initial_restarts,
    local_restarts,
    reconstruction,
    restart_scores,
    valid_scores,
)
from .targets import TargetMismatchError, attack_victim, check_target
from .threat_model import threat_model

log = logging.getLogger(__name__)

# Called as ``optimizer(params, lr)``: the learning rate is the module's ``lr``, never an option of the optimiser.
OptimizerFactory = Callable[[Iterable[Tensor], float], Optimizer]
__all__ = ["GradientInversion", "Reconstruction", "TargetMismatchError", "dummy_images_as_pixels"]


class _StepTicks(Dataset):
    """The attack has no data to iterate over: one dummy item per optimisation step drives the Trainer."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> Tensor:
        return torch.zeros(())


class GradientInversion(pl.LightningModule):
    """Reconstruct a client's private images from the update it shared.

    Args:
        victim: the shared model: a name from ``lightning_inversion.victims.list_victims()`` or any ``nn.Module``.
            Its parameters are frozen; the attack differentiates the client's update functionally.
        num_classes: classes of the victim (set from the data by the CLI).
        image_shape: ``(C, H, W)`` of the victim's input (set from the data by the CLI).
        mean: per-channel normalisation mean of the victim's input (set from the data by the CLI).
        std: per-channel normalisation std (set from the data by the CLI).
        num_images: B, the number of images in the client's batch (set from the data by the CLI).
        restarts: R independent trials, optimised together as a batch axis; the best one wins.
        targets: T updates attacked in one fit (:meth:`set_targets`).
        objective: the gradient-matching objective, a :class:`~.objectives.MatchingObjective` (``Cosine``,
            ``LocalCosine``, ``L2``, ``L1``, ``MaxDifference``, with the compared layers and their weights) or the
            short name of one with its defaults: ``sim``, ``simlocal``, ``l2``, ``l1``, ``max``.
        tv: weight of a total-variation prior (0: none; not beside a ``TotalVariation`` in ``priors``).
        priors: further image priors, each a :class:`~.priors.ImagePrior` with its weight.
        signed: feed the optimiser the sign of the image gradient (the paper's signed Adam).
        boxed: clamp the dummy images to the valid pixel range [0, 1] after every step.
        init: initial dummy images: ``randn``, ``rand`` (uniform in [−1, 1]), ``zeros``, or ``analytic``
            (closed-form recovery through the first biased linear layer: exact for an MLP, with max_steps 0).
        optimizer: the optimiser class (or callable) over the dummy images (and soft labels) only, e.g.
            ``torch.optim.Adam``, ``torch.optim.SGD`` or ``torch.optim.LBFGS``; options other than the learning
            rate go in ``init_args`` (e.g. ``momentum``).
        lr: the optimiser's learning rate, the only one (``optimizer`` is called as ``optimizer(params, lr)``).
        lr_decay: multiply the learning rate by 0.1 at 3/8, 5/8 and 7/8 of ``trainer.max_steps``.
        median_filter_every: apply a 3×3 median filter to the dummy images every this many steps (0: never).
        label_strategy: a :class:`~.labels.LabelStrategy` or a short name: ``given`` (shared with the update),
            ``idlg`` (recovered from the last layer, one image), ``batch`` (label counts, any B), ``dlg`` (soft
            labels optimised with the images); ``auto``: ``given`` when the update carries labels, else ``idlg``
            for one image and ``batch`` for several.
        restart_selection: a :class:`~.restarts.RestartSelection` or a short name: the restart with the lowest
            ``matching`` cost (without priors) or the lowest ``tv``; or the per-pixel ``mean``/``median`` over
            valid restarts. A restart whose score is NaN, or that never ran, never wins.
        client: the client's protocol (FedSGD gradient or FedAvg local steps), known to the server. ``None``:
            FedSGD in eval mode.
        pretrained: with a victim given by name, load its pretrained weights (torchvision models).
        victim_weights: a state-dict file (``.pt``, ``.safetensors`` or ``.npz``) loaded into the victim, given by
            name or as a module: the global weights the server sent.
        victim_checkpoint: a checkpoint written by ``train_victim.py``: the victim's architecture and weights come
            from it (``victim`` is then ignored), and its classes, image shape and normalisation must agree with
            the data's.
        seed: restart r starts from images drawn with seed ``seed + r``, as separate runs with those seeds.
    """

    def __init__(
        self,
        victim: str | nn.Module = "ConvNet-16",
        num_classes: PositiveInt = 8,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        num_images: PositiveInt = 1,
        restarts: PositiveInt = 1,
        targets: PositiveInt = 1,
        objective: Cost | MatchingObjective = "sim",
        tv: NonNegativeFloat = 1e-2,
        priors: list[ImagePrior] | None = None,
        signed: bool = True,
        boxed: bool = True,
        init: Init = "randn",
        optimizer: OptimizerFactory = torch.optim.Adam,
        lr: PositiveFloat = 0.1,
        lr_decay: bool = True,
        median_filter_every: NonNegativeInt = 0,
        label_strategy: Literal["auto", "given", "idlg", "batch", "dlg"] | LabelStrategy = "auto",
        restart_selection: Literal["matching", "tv", "mean", "median"] | RestartSelection = "matching",
        client: Client | None = None,
        pretrained: bool = False,
        victim_weights: str | None = None,
        victim_checkpoint: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        priors = _checked(
            restarts, num_images, num_classes, median_filter_every, lr, tv, image_shape, mean, std, priors
        )
        _check_whole("targets", targets, 1)
        # Plain Python values (not the parser's PositiveInt...): hyperparameters load with weights_only=True. The
        # parts given as objects are not hyper-parameters: run_identity() describes them.
        num_classes, num_images, restarts, lr = int(num_classes), int(num_images), int(restarts), float(lr)
        tv, median_filter_every, image_shape = (
            float(tv),
            int(median_filter_every),
            tuple(map(int, image_shape)),
        )
        if client is not None:
            client.split(num_images)
        parts = {
            "objective": objective,
            "label_strategy": label_strategy,
            "restart_selection": restart_selection,
        }
        ignore = ["client", "optimizer", "priors"] + [k for k, v in parts.items() if not isinstance(v, str)]
        self.save_hyperparameters(ignore=ignore + ([] if isinstance(victim, str) else ["victim"]))
        self.victim = attack_victim(
            victim, num_classes, image_shape, mean, std, pretrained, victim_weights, victim_checkpoint
        )
        self.client = client or Client()
        self.num_classes, self.image_shape, self.mean, self.std = (
            num_classes,
            image_shape,
            tuple(mean),
            tuple(std),
        )
        self.num_images, self.restarts, self.tv, self.seed = num_images, restarts, tv, seed
        self.targets = int(targets)
        slots = self.targets * restarts  # (target, restart) pairs, target-major: slot t·R + r
        if self.targets > 1 and init == "analytic":
            raise InputError("init 'analytic' recovers one target's images: use targets 1")
        self.objective = OBJECTIVES[objective]() if isinstance(objective, str) else objective
        self.priors = ([TotalVariation(tv)] if tv > 0 else []) + priors
        self.label_strategy = _part(label_strategy, LABEL_STRATEGIES)
        self.restart_selection = _part(restart_selection, SELECTIONS)
        self.signed, self.boxed, self.init = signed, boxed, init
        self.optimizer_factory, self.lr, self.lr_decay = optimizer, lr, lr_decay
        self.median_filter_every = median_filter_every

        soft = (num_images, num_classes) if self.label_strategy.soft else None
        images, soft_labels = initial_restarts(slots, seed, init, (num_images, *image_shape), soft)
        self.dummy_images = nn.Parameter(images)  # (T·R, B, C, H, W): see images_by_target
        self.dummy_labels = nn.Parameter(soft_labels) if soft_labels is not None else None
        labels_shape = (num_images,) if self.targets == 1 else (self.targets, num_images)
        self.register_buffer("target_labels", torch.zeros(labels_shape, dtype=torch.long))  # (B,) or (T, B)
        self.register_buffer("restart_steps", torch.zeros(slots, dtype=torch.long))
        self.update: Update | None = None  # the (first) target update
        self.updates: list[Update] = []  # every target's update
        self.matching: GradientMatching | None = (
            None  # the objective bound to the (first) target, by prepare()
        )
        self.matchings: list[GradientMatching] = []
        self._box: tuple[Tensor, Tensor] | None = None
        self._local: Tensor = torch.arange(slots)  # the (target, restart) slots this process optimises
        self._local_on_device: Tensor | None = None
        self._world = 1  # processes sharing the slots
        self.last_cost = torch.full((slots,), math.nan)  # each slot's latest matching cost (no priors)
        self._reconstructions: list[Reconstruction] | None = None
        self.analytic_features: Tensor | None = None  # the closed-form input of the first linear layer
        self.analytic_exact = False  # whether those are the images themselves
        self._identity: dict | None = None
        self._started: float | None = None
        self._seconds = 0.0
        self._rng_to_restore: dict | None = None  # a checkpoint's RNG state, applied once on the right device

    # --- setting up ---------------------------------------------------------------------------------------
    def set_target(self, update: Update) -> None:
        """Set the update to invert; checks it against the victim and recovers labels if asked to."""
        self.set_targets([update])

    def set_targets(self, updates: list[Update]) -> None:
        """Set the T updates to invert (one per target), each checked and its labels recovered if asked to."""
        if len(updates) != self.targets:
            raise TargetMismatchError(
                f"{len(updates)} target updates for an attack on targets={self.targets}"
            )
        for t, update in enumerate(updates):
            check_target(update, self.victim, self.client, self.num_images, self.num_classes)
            strategy = self.label_strategy.resolve(update, self.num_images)
            try:
                labels = strategy.labels(update, self.victim, self.num_images, self.num_classes)
            except ValueError as error:
                raise TargetMismatchError(f"label_strategy {strategy.name!r}: {error}") from None
            if labels is not None:
                row = self.target_labels if self.targets == 1 else self.target_labels[t]
                row.copy_(labels.to(self.target_labels.device))
        self.update, self.updates = updates[0], list(updates)
        if self.init == "analytic":
            self._analytic_init(updates[0])

    @property
    def images_by_target(self) -> Tensor:
        """The dummy images as ``(T, R, B, C, H, W)`` (a view of the parameter)."""
        return self.dummy_images.view(self.targets, self.restarts, *self.dummy_images.shape[1:])

    def _analytic_init(self, update: Update, overwrite_images: bool = True) -> None:
        from .analytic import analytic_start

        try:
            self.analytic_features, self.analytic_exact = analytic_start(
                self.victim, update, self.image_shape
            )
        except ValueError as error:
            raise InputError(f"init 'analytic': {error}") from None
        if self.analytic_exact and overwrite_images:
            with torch.no_grad():
                self.dummy_images.copy_(
                    self.analytic_features.view(self.image_shape).expand_as(self.dummy_images)
                )

    @property
    def labels_from(self) -> str:
        """The label strategy in use, with ``auto`` resolved against the target update."""
        return self.label_strategy.resolve(self.update, self.num_images).name

    def setup(self, stage: str) -> None:
        world, rank = 1, 0
        if self._trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            check_precision(self.trainer.precision)
        self._local, self._local_on_device, self._world = (
            local_restarts(self.targets * self.restarts, world, rank),
            None,
            world,
        )

    def on_fit_start(self) -> None:
        # Checked here, not in setup: a checkpoint being resumed is restored after setup and brings the update.
        if self.trainer.max_steps == 0 and not self.analytic_exact and int(self.restart_steps.max()) == 0:
            raise InputError(
                "trainer max_steps 0 runs no optimisation step: the images would be the random initialisation. "
                "Give max_steps >= 1; 0 fits only init 'analytic' on a victim whose first linear layer reads the "
                "image (an MLP)"
            )
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["cpu"])
            if "cuda" in self._rng_to_restore and self.device.type == "cuda":
                torch.cuda.set_rng_state(self._rng_to_restore["cuda"], self.device)
            self._rng_to_restore = None
        self.prepare()

    def prepare(self) -> None:
        """Bind the objective and the priors to the target update on the module's device (before a step).

        Raises:
            RuntimeError: no target update is set.
            InputError: a layer selection that does not fit the victim.
        """
        if self.update is None:
            raise RuntimeError(
                "no target update: call set_target(update) before fitting, or resume a checkpoint"
            )
        self.updates = [u.to(self.device) for u in (self.updates or [self.update])]
        self.update = self.updates[0]
        # On a GPU the cosine runs over one concatenated vector (fewer kernel launches); on a CPU per tensor, which
        # is faster there (BENCHMARKS.md).
        flat = self.device.type == "cuda"
        try:
            self.matchings = [self.objective.bind(u.tensors, flat=flat) for u in self.updates]
        except ValueError as error:  # a layer selection that does not fit this victim
            raise InputError(f"objective layers {self.objective.layers!r}: {error}") from None
        self.matching = self.matchings[0]
        if any(m.indices != self.matching.indices for m in self.matchings):
            raise InputError(
                f"objective layers {self.objective.layers!r} compare other tensors for each target"
            )
        for prior in self.priors:
            if self.targets > 1 and type(prior).prepare is not ImagePrior.prepare:
                raise InputError(f"the prior {type(prior).__name__} reads the target update: use targets 1")
            prior.prepare(self.victim, self.update)
        self._box = box_bounds(self.mean, self.std, self.dummy_images)
        self.last_cost = self.last_cost.to(self.device)

    # --- the objective -------------------------------------------------------------------------------------
    def client_pass(self, images: Tensor, labels: Tensor) -> tuple[list[Tensor], dict]:
        """The client's update for each restart's dummy images (compared tensors only), and what its first forward
        pass saw for the priors (only what they need; nothing otherwise).

        Args:
            images: ``(r, B, C, H, W)`` dummy images.
            labels: ``(B,)`` hard labels, or ``(r, B, K)`` soft-label logits.

        Returns:
            one ``(r, *shape)`` tensor per compared victim parameter; ``seen`` with the leading ``r`` axis.
        """
        needs = sorted(set().union(*(p.needs for p in self.priors)))
        return batched_client_pass(self.client, self.victim, images, labels, self.matching.indices, needs)

    def dummy_update(self, images: Tensor, labels: Tensor) -> list[Tensor]:
        """The client's update for each restart's dummy images, for the compared tensors only."""
        return self.client_pass(images, labels)[0]

    def restart_costs(
        self, images: Tensor, labels: Tensor, slots: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Matching cost and the weighted sum of the priors of each restart, both ``(r,)`` in fp32.

        ``slots``: the (target, restart) slots of ``images`` (on the CPU, ascending; all when ``None``), which say
        the target each is matched with. Under mixed precision the victim's passes run in half precision; the
        dummy update is cast to fp32 and the objective runs outside autocast, so the cosine is never rounded in
        half precision.
        """
        dummy, seen = self.client_pass(images, labels)  # the objective casts to fp32 what is not
        with torch.autocast(self.device.type, enabled=False):
            if self.targets == 1:
                return self.matching(dummy), self._priors(images, seen)
            # Each target's slots on their own: its objective, and priors over its restarts only.
            owners = (torch.arange(len(images)) if slots is None else slots) // self.restarts
            targets, counts = torch.unique_consecutive(owners, return_counts=True)
            split = counts.tolist()
            parts = zip(
                targets.tolist(),
                zip(*(g.split(split) for g in dummy), strict=True),
                images.split(split),
                _split_tree(seen, split),
                strict=True,
            )
            costs, priors = zip(
                *[(self.matchings[t](list(d)), self._priors(x, s)) for t, d, x, s in parts], strict=True
            )
            return torch.cat(costs), torch.cat(priors)

    def _priors(self, images: Tensor, seen: dict) -> Tensor:
        """The weighted sum of the priors of some restarts of one target, ``(r,)``."""
        return sum((p(images, seen) for p in self.priors), torch.zeros(len(images), device=images.device))

    def _labels(self, idx: Tensor) -> Tensor:
        """The labels of some slots: ``(B,)`` shared, ``(r, B)`` per target, or ``(r, B, K)`` soft logits."""
        if self.dummy_labels is not None:
            return self.dummy_labels[idx]
        if self.targets == 1:
            return self.target_labels
        return self.target_labels[idx.to(self.target_labels.device) // self.restarts]

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if self._local_on_device is None or self._local_on_device.device != self.device:
            self._local_on_device = self._local.to(self.device)  # copied once: a copy syncs
        idx = self._local_on_device
        if len(idx) == 0:  # more processes than restarts: this one only joins the all-reduce
            return self.dummy_images.sum() * 0
        images = self.dummy_images if len(idx) == len(self.dummy_images) else self.dummy_images[idx]
        for image_prior in self.priors:  # weight schedules (group consistency)
            image_prior.at_step(self.global_step, self.trainer.max_steps if self._trainer is not None else 0)
        cost, prior = self.restart_costs(images, self._labels(idx), self._local)
        loss = cost + prior  # (r,)
        with torch.no_grad():
            self.last_cost[idx] = cost.detach()
        if self._logs_this_step():
            # This process's restarts only: a sync over ranks every step would cost more than the numbers are worth.
            best = cost.detach().min()
            self.log("train/matching_cost", best, prog_bar=True)
            if self.objective.cost == "sim":  # the global cosine between the dummy and the target update
                self.log("train/gradient_cosine", 1 - best)
            self.log("train/loss", loss.detach().mean())
            self.log("train/prior", prior.detach().mean())
        # DDP averages gradients over processes: each slice comes from one process, so scale by the world size.
        return loss.sum() * self._world

    def _logs_this_step(self) -> bool:
        """Whether the Trainer writes this step's scalars: every ``log_every_n_steps`` steps and the last one.

        ``self.log`` costs about a millisecond a call, as much as a whole step of a small victim, and the
        loggers write only on those steps anyway (the progress bar keeps the latest value).
        """
        if self._trainer is None:
            return True
        step = self.trainer.global_step + 1  # the step this training_step is about to complete
        last = self.trainer.max_steps is not None and step >= self.trainer.max_steps > 0
        return last or step % max(self.trainer.log_every_n_steps, 1) == 0

    def _optimized(self) -> list[Tensor]:
        return [self.dummy_images] + ([self.dummy_labels] if self.dummy_labels is not None else [])

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        loss.backward(inputs=self._optimized())  # the victim never accumulates .grad

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self.signed:
            for p in self._optimized():
                if p.grad is not None:
                    p.grad.sign_()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with torch.no_grad():
            # Counted here, not in training_step: L-BFGS evaluates the closure up to max_iter times a step. Every
            # restart takes part in every step (on some process), so all counters advance together.
            self.restart_steps += 1
            if self.median_filter_every and (self.global_step + 1) % self.median_filter_every == 0:
                self.dummy_images.copy_(median_filter3x3(self.dummy_images))
            if self.boxed:
                self.dummy_images.copy_(project_box(self.dummy_images, *self._box))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self._optimized(), self.lr)
        if self.signed and isinstance(optimizer, torch.optim.LBFGS):
            log.warning("signed gradients with L-BFGS break its line search; consider signed=False")
        if not self.lr_decay:
            return optimizer
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 0:
            raise ValueError(
                "set trainer.max_steps: the learning-rate decay is placed at 3/8, 5/8, 7/8 of it"
            )
        # On resume, the checkpoint's scheduler state (its milestones included) replaces these milestones.
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, decay_milestones(max_steps), gamma=0.1)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def train_dataloader(self) -> DataLoader:
        steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 1
        # Under DDP a DistributedSampler deals the ticks out over the processes: give each one epoch of max_steps.
        return DataLoader(_StepTicks(steps * self._world), batch_size=None, num_workers=0)

    def train(self, mode: bool = True) -> GradientInversion:
        super().train(mode)
        self.victim.train(self.client.train_mode)  # the client's mode, whatever the Trainer asks
        return self

    # --- checkpoints ---------------------------------------------------------------------------------------
    # Everything saved here is tensors and plain Python values: checkpoints load with ``weights_only=True``.
    def run_identity(self) -> dict:
        """What, besides the hyper-parameters and the target update, makes two runs the same attack.

        The digest of the victim's weights, the client's protocol, the optimiser and the parts (objective, priors,
        label strategy, restart selection); saved in every checkpoint (``attack_identity``) so that a resumed run
        can check that it continues the same attack.
        """
        if self._identity is None:
            from .checkpoints import digest

            self._identity = {
                "victim": digest(dict(self.victim.state_dict())),
                "client": describe(self.client)["init_args"],
                "optimizer": describe_factory(self.optimizer_factory),
                "parts": {
                    "objective": describe(self.objective),
                    "priors": [describe(p) for p in self.priors],
                    "label_strategy": describe(self.label_strategy),
                    "restart_selection": describe(self.restart_selection),
                },
            }
        return self._identity

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.update is not None:
            checkpoint["target_update"] = self.update.state_dict()
        if self.targets > 1 and self.updates:
            checkpoint["target_updates"] = [u.state_dict() for u in self.updates]
        checkpoint["attack_identity"] = self.run_identity()
        checkpoint["attack_seconds"] = self._elapsed()
        if self._trainer is not None:
            checkpoint["attack_max_steps"] = int(self.trainer.max_steps)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        checkpoint["attack_rng"] = rng

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "target_update" in checkpoint:
            self.update = Update.from_state_dict(checkpoint["target_update"])
            stored = checkpoint.get("target_updates") or [checkpoint["target_update"]]
            self.updates = [Update.from_state_dict(u) for u in stored]
            if self.init == "analytic" and self.analytic_features is None:  # not saved; the images are
                self._analytic_init(self.update, overwrite_images=False)
        self._seconds = float(checkpoint.get("attack_seconds", 0.0))
        if self._trainer is None:  # loading weights (load_from_checkpoint), not resuming a run
            return
        self._rng_to_restore = checkpoint.get("attack_rng")
        planned = checkpoint.get("attack_max_steps")
        if self.lr_decay and planned is not None and planned != self.trainer.max_steps:
            rank_zero_warn(
                f"resuming a run planned for {planned} steps with max_steps={self.trainer.max_steps}: the "
                f"learning-rate milestones stay those of {planned} steps ({decay_milestones(planned)})"
            )

    # --- the end: scoring restarts without ground truth ----------------------------------------------------
    def on_train_start(self) -> None:
        self._started = time.perf_counter()

    def _elapsed(self) -> float:
        return self._seconds + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def on_train_end(self) -> None:
        self._seconds, self._started = self._elapsed(), None
        self.reconstructions = self.reconstruct_results(sync=True)

    @property
    def reconstructions(self) -> list[Reconstruction] | None:
        """The results of the last ``fit``, one per target (``None`` before one ran a step).

        Under ``ddp_spawn`` the run happens in worker processes and only the module's state comes back to the
        caller, so the results are rebuilt from the returned dummy images on first access.
        """
        if self._reconstructions is None and self._came_back_from_workers():
            self._reconstructions = self.reconstruct_results()
        return self._reconstructions

    @reconstructions.setter
    def reconstructions(self, value: list[Reconstruction] | None) -> None:
        self._reconstructions = value

    @property
    def reconstruction(self) -> Reconstruction | None:
        """The result of the last ``fit`` for the first (with ``targets`` 1, the only) target."""
        return None if self.reconstructions is None else self.reconstructions[0]

    @reconstruction.setter
    def reconstruction(self, value: Reconstruction) -> None:
        self._reconstructions = [value]

    def _came_back_from_workers(self) -> bool:
        # The caller's copy of a spawned run has run steps but no trainer (or a finished one), and no result.
        if self.update is None or (self._trainer is not None and not self.trainer.state.finished):
            return False
        return bool(self.restart_steps.max() > 0)

    @torch.no_grad()
    def restart_scores(self, sync: bool = False) -> Tensor:
        """Each restart's score for selection (lower is better), ``(R,)``; NaN or never-run restarts get +inf."""
        if self.matching is None:
            self.prepare()
        local = self._local.to(self.dummy_images.device)

        def matching(images: Tensor) -> Tensor:
            return self.restart_costs(images, self._labels(local), self._local)[0]

        scores = restart_scores(self.restart_selection, self.dummy_images, local, matching)
        if sync and self._trainer is not None and self.trainer.world_size > 1:
            scores = self.trainer.strategy.reduce(scores, reduce_op="sum")
        return valid_scores(scores, self.restart_steps, self.analytic_exact)

    def reconstruct_results(self, sync: bool = False) -> list[Reconstruction]:
        """Score the restarts and build one :class:`Reconstruction` per target (images de-normalised to [0, 1]);
        each target's restarts are chosen among themselves."""
        scores, pixels, r = self.restart_scores(sync), dummy_images_as_pixels(self), self.restarts
        results = []
        for t in range(self.targets):
            own = slice(t * r, (t + 1) * r)
            if self.dummy_labels is not None:
                labels = self.dummy_labels[own].detach()
            else:
                labels = self.target_labels if self.targets == 1 else self.target_labels[t]
            update = self.updates[t] if self.updates else self.update
            results.append(
                reconstruction(
                    self.restart_selection,
                    pixels[own],
                    scores[own],
                    self.restart_steps[own],
                    labels,
                    self.label_strategy.resolve(update, self.num_images).name,
                    self._seconds,
                )  # fmt: skip
            )
            results[-1].threat_model = self.threat_model(update)
        return results

    def reconstruct_result(self, sync: bool = False) -> Reconstruction:
        """The first (with ``targets`` 1, the only) target's :class:`Reconstruction`."""
        return self.reconstruct_results(sync)[0]

    def threat_model(self, update: Update | None = None) -> dict:
        """What this attack assumes of one target: labels, BatchNorm statistics, images known, the client's mode
        (:func:`~lightning_inversion.threat_model.threat_model`)."""
        update = update if update is not None else self.update
        labels_from = (
            self.label_strategy.resolve(update, self.num_images).name if update is not None else None
        )
        known = update is not None and update.num_images is not None
        return threat_model(labels_from, self.priors, self.num_images, known, self.client.train_mode)


def _split_tree(tree, sizes: list[int]) -> list:
    """A tree of tensors with a leading axis, split into len(sizes) trees along it."""
    if isinstance(tree, Tensor):
        return list(tree.split(sizes))
    if isinstance(tree, tuple | list):
        return [type(tree)(parts) for parts in zip(*(_split_tree(t, sizes) for t in tree), strict=True)]
    if isinstance(tree, dict):
        keys, values = list(tree), [_split_tree(v, sizes) for v in tree.values()]
        return (
            [dict(zip(keys, parts, strict=True)) for parts in zip(*values, strict=True)]
            if keys
            else [{} for _ in sizes]
        )
    raise TypeError(f"cannot split {type(tree).__name__}")


def _checked(restarts, num_images, num_classes, median_filter_every, lr, tv, image_shape, mean, std, priors):
    """Refuse the module's options that the parser's types do not (from Python); the priors as a list."""
    for name, value, low in [("restarts", restarts, 1), ("num_images", num_images, 1)]:
        _check_whole(name, value, low)
    _check_whole("num_classes", num_classes, 1)
    _check_whole("median_filter_every", median_filter_every, 0)
    _check_number("lr", lr, positive=True)
    _check_number("tv", tv, positive=False)
    if len(image_shape) != 3 or not all(_whole(s) and s >= 1 for s in image_shape):
        raise InputError(f"image_shape must be three whole numbers >= 1 (C, H, W), got {image_shape}")
    if len(mean) != image_shape[0] or len(std) != image_shape[0]:
        raise InputError(f"mean {mean} and std {std} must have one value per channel of {image_shape}")
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise InputError(f"std must be finite and > 0 in every channel, got {std}")
    priors = list(priors or [])
    if tv > 0 and any(isinstance(p, TotalVariation) for p in priors):
        raise InputError("total variation is given twice: set tv 0 or drop the TotalVariation prior")
    return priors


def _part(value, short_names: dict[str, type]):
    """A part given as an object, or by its short name (a class with its defaults)."""
    return short_names[value]() if isinstance(value, str) else value


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_whole(name: str, value, low: int) -> None:
    if not _whole(value) or value < low:
        raise InputError(f"{name} must be a whole number >= {low}, got {value!r}")


def _check_number(name: str, value, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise InputError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def dummy_images_as_pixels(module: GradientInversion, idx: Sequence[int] | None = None) -> Tensor:
    """The current dummy images de-normalised and clamped to [0, 1], ``(R, B, C, H, W)`` (or selected restarts)."""
    images = module.dummy_images.detach().float()
    if idx is not None:
        images = images[list(idx)]
    return denormalize(images, module.mean, module.std).clamp(0, 1)
