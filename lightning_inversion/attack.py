"""The attack: gradient inversion as a LightningModule whose parameters are the dummy images.

Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients — How easy is it to break privacy in federated
learning?", NeurIPS 2020: gradient matching plus image priors, signed Adam under a box constraint, several random
restarts (and targets) at once. :class:`GradientInversion` is the Lightning-free :class:`~.inversion.Inversion`
(dummy images, target updates, costs, scores, results) with the step, the sign, the box and the checkpoint hooks.
Several devices (``strategy="ddp"``, any ``num_nodes``) split the slots (:mod:`.restarts`); ``bf16-mixed`` and
``16-mixed`` run the victim's passes in half precision, the images and the objective in fp32 (true half precision
is refused). Checkpoints hold the target updates, the RNG state and what identifies the run: ``fit(ckpt_path=...)``
continues bit-identically without the private data, with the learning-rate milestones of the checkpointed run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Literal

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from . import inversion
from .client import Client
from .images import IMAGENET_MEAN, IMAGENET_STD, median_filter3x3, project_box
from .inversion import Inversion, dummy_images_as_pixels
from .labels import LABEL_STRATEGIES, LabelStrategy
from .notices import check_precision
from .objectives import OBJECTIVES, Cost, MatchingObjective
from .parts import check_options, check_whole, part
from .priors import ImagePrior, attack_priors
from .restarts import SELECTIONS, Init, Reconstruction, RestartSelection, local_restarts
from .targets import TargetMismatchError, attack_victim

log = logging.getLogger(__name__)

# Called as ``optimizer(params, lr)``: the learning rate is the module's ``lr``, never an option of the optimiser.
OptimizerFactory = Callable[[Iterable[Tensor], float], Optimizer]
__all__ = ["GradientInversion", "Reconstruction", "TargetMismatchError", "dummy_images_as_pixels"]


class GradientInversion(Inversion, pl.LightningModule):
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
        client: the client's protocol (FedSGD gradient, FedAvg local steps), known to the server; ``None``: FedSGD.
        pretrained: with a victim given by name, load its pretrained weights (torchvision models).
        victim_weights: a state-dict file (``.pt``, ``.safetensors`` or ``.npz``) loaded into the victim, given by
            name or as a module: the global weights the server sent.
        victim_checkpoint: a checkpoint written by ``train_victim.py``: the victim's architecture and weights
            (``victim`` is then ignored); its classes, image shape and normalisation must agree with the data's.
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
        check_options(restarts, num_images, num_classes, median_filter_every, lr, tv, image_shape, mean, std)
        check_whole("targets", targets, 1)
        # Plain Python values (not the parser's PositiveInt...): hyperparameters load with weights_only=True. The
        # parts given as objects are not hyper-parameters: run_identity() describes them.
        num_classes, num_images, restarts = int(num_classes), int(num_images), int(restarts)
        lr, tv, median_filter_every = float(lr), float(tv), int(median_filter_every)
        image_shape = tuple(map(int, image_shape))
        if client is not None:
            client.split(num_images)
        built = attack_victim(
            victim, num_classes, image_shape, mean, std, pretrained, victim_weights, victim_checkpoint
        )
        parts = part(objective, OBJECTIVES), attack_priors(tv, priors), part(label_strategy, LABEL_STRATEGIES)
        geometry = num_classes, image_shape, mean, std, num_images, restarts, int(targets), seed, init
        super().__init__(built, client or Client(), *parts, part(restart_selection, SELECTIONS), *geometry)
        given = dict(objective=objective, label_strategy=label_strategy, restart_selection=restart_selection)
        objects = [k for k, v in {**given, "victim": victim}.items() if not isinstance(v, str)]
        self.save_hyperparameters(ignore=["client", "optimizer", "priors", *objects])
        self.tv, self.signed, self.boxed, self.median_filter_every = tv, signed, boxed, median_filter_every
        self.optimizer_factory, self.lr, self.lr_decay = optimizer, lr, lr_decay
        # Processes sharing the slots, this one's slots on its device; run_identity(); a checkpoint's RNG state.
        self._world, self._local_on_device, self._identity, self._rng_to_restore = 1, None, None, None

    def setup(self, stage: str) -> None:
        world, rank = 1, 0
        if self._trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            check_precision(self.trainer.precision)
        self._local = local_restarts(self.targets * self.restarts, world, rank)  # this process's slots
        self._local_on_device, self._world = None, world

    def on_fit_start(self) -> None:
        # Checked here, not in setup: a checkpoint being resumed is restored after setup and brings the update.
        inversion.check_steps(self.trainer.max_steps, self.analytic_exact, int(self.restart_steps.max()))
        if self._rng_to_restore is not None:
            inversion.restore_rng(self._rng_to_restore, self.device)
            self._rng_to_restore = None
        self.prepare()

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
        """Whether the Trainer writes this step's scalars (:func:`~.inversion.logs_this_step`)."""
        return self._trainer is None or inversion.logs_this_step(self.trainer)

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
        # On resume, the checkpoint's scheduler state (its milestones included) replaces these milestones.
        return inversion.decay_schedule(optimizer, self.trainer.max_steps) if self.lr_decay else optimizer

    def train_dataloader(self) -> DataLoader:
        ticks = inversion.StepTicks(self.trainer.max_steps, self._world)  # each process steps max_steps times
        return DataLoader(ticks, batch_size=None, num_workers=0)

    def run_identity(self) -> dict:
        """What, besides the hyper-parameters and the target updates, makes two runs the same attack (saved in every
        checkpoint so that a resumed run can check it continues the attack): :func:`~.inversion.run_identity`."""
        if self._identity is None:
            self._identity = inversion.run_identity(self, self.optimizer_factory)
        return self._identity

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        checkpoint.update(self.run_state(self.run_identity(), max_steps))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.restore_run_state(checkpoint)
        if self._trainer is not None:  # resuming a run, not loading weights (load_from_checkpoint)
            self._rng_to_restore = checkpoint.get("attack_rng")
            remark = inversion.resume_remark(checkpoint.get("attack_max_steps"), self.trainer.max_steps)
            if self.lr_decay and remark is not None:
                rank_zero_warn(remark)

    def on_train_start(self) -> None:
        self._clock.start()

    def on_train_end(self) -> None:
        self.finish(sync=True)

    def _sum_over_processes(self, scores: Tensor) -> Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(scores, reduce_op="sum")
        return scores

    def _running(self) -> bool:
        # The caller's copy of a spawned run has run steps but no trainer (or a finished one), and no result.
        return self._trainer is not None and not self.trainer.state.finished
