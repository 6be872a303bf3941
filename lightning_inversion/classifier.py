"""Training a victim: a registry classifier with the paper's recipe, for ``python train_victim.py fit``.

Geiping et al. 2020 train their victims with SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4), batch 128,
120 epochs, lr ×0.1 at epochs 44, 74 and 105. Those are this module's defaults; the epochs and the batch size
come from the trainer and data configs. :func:`lightning_inversion.victims.load_victim_checkpoint` rebuilds the
trained victim from the checkpoint without Lightning.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from .errors import InputError
from .images import CIFAR10_MEAN, CIFAR10_STD
from .victims import build_victim


class VictimClassifier(pl.LightningModule):
    """A victim from the registry, trained as a classifier on normalised images with cross-entropy.

    ``configure_optimizers`` implements the recipe set by the arguments below. LightningCLI also offers
    ``--optimizer``/``--lr_scheduler``; unset (the default) they change nothing. Giving ``--optimizer`` replaces
    this whole recipe, schedule included, by that optimiser and the ``--lr_scheduler`` if any (LightningCLI warns
    that ``configure_optimizers`` is overridden).

    Args:
        victim: a name from ``lightning_inversion.victims.list_victims()`` (or a registry template).
        num_classes: number of classes (set from the data by the CLI).
        image_shape: ``(C, H, W)`` of the inputs (set from the data by the CLI).
        mean: per-channel normalisation mean of the inputs (set from the data by the CLI); kept in the
            checkpoint so an attack knows the victim's input space.
        std: per-channel normalisation std (set from the data by the CLI).
        pretrained: start from published weights (torchvision victims only).
        lr: SGD learning rate.
        momentum: SGD momentum.
        nesterov: use Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 weight decay of every parameter.
        milestones: epochs after which the learning rate is multiplied by ``gamma``.
        gamma: the learning-rate factor at each milestone.
    """

    def __init__(
        self,
        victim: str = "ResNet20-4",
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        pretrained: bool = False,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        milestones: tuple[int, ...] = (44, 74, 105),
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if nesterov and momentum <= 0:
            raise InputError(f"Nesterov momentum needs momentum > 0, got {momentum}")
        if len(mean) != image_shape[0] or len(std) != image_shape[0]:
            raise InputError(f"mean {mean} and std {std} need one value per channel of {image_shape}")
        # Plain Python types in the hyper-parameters, so the checkpoint loads with torch.load(weights_only=True)
        # (save_hyperparameters reads these locals; under the CLI it stores the parsed config, plain already).
        image_shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        milestones = tuple(int(m) for m in milestones)
        self.save_hyperparameters()
        self.victim = build_victim(victim, num_classes, image_shape, pretrained=pretrained)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of normalised images ``(B, C, H, W)``."""
        return self.victim(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_acc(logits, labels)
        self.log("test/loss", F.cross_entropy(logits, labels))
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """SGD with (Nesterov) momentum and weight decay, lr ×``gamma`` after each epoch in ``milestones``."""
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp.lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov,
            weight_decay=hp.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=hp.milestones, gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
