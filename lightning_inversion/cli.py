"""The command line of both scripts: ``invert.py`` (the attack) and ``train_victim.py`` (victim training)."""

from __future__ import annotations

import logging
import sys

from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from .attack import GradientInversion, TargetMismatchError
from .client import Client
from .data import MissingDataError, VisionData
from .images import denormalize
from .report import InversionReport

log = logging.getLogger(__name__)

# Errors that mean "something the user must provide is missing or wrong": a message, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (MissingDataError, TargetMismatchError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    from .victims import MissingWeightsError

    errors = (*USER_ERRORS, MissingWeightsError)
    try:
        from .update_io import UpdateFileError

        errors = (*errors, UpdateFileError)
    except ImportError:  # pragma: no cover
        pass
    return errors


class InversionCLI(LightningCLI):
    """LightningCLI for a model trained on (``train_victim.py``) or attacking (``invert.py``) a VisionData.

    The data decides the image shape, the number of classes and the normalisation of the model, so nobody types
    them twice. For the attack, ``fit`` first lets the simulated client compute its update from the private
    batch, hands the update to the attack and the ground truth to the report, and only then runs the Trainer.
    """

    def __init__(self, model_class: type[LightningModule], *args, **kwargs) -> None:
        self.attack = issubclass(model_class, GradientInversion)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", not self.attack)
        super().__init__(model_class, VisionData, *args, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": "lightning_inversion.data.PhotoData"}})
        for key in ("num_classes", "image_shape", "mean", "std"):
            parser.link_arguments("data", f"model.{key}", compute_fn=_attribute(key), apply_on="instantiate")
        if self.attack:
            parser.link_arguments("data", "model.num_images", compute_fn=_attribute("batch_images"), apply_on="instantiate")
            parser.add_class_arguments(Client, "client", fail_untyped=True)
            parser.link_arguments("client", "model.client", apply_on="instantiate")
            parser.add_lightning_class_args(InversionReport, "report")
            parser.add_argument(
                "--update",
                type=str | None,
                default=None,
                help="Attack an update saved by another program (.safetensors, or a .pt dict/list of tensors, "
                "loaded without unpickling code) instead of simulating the client on the data's private batch. "
                "The data then only sets image shape, classes and normalisation; the client options say what "
                "the update is (gradient, or FedAvg delta/weights).",
            )
            parser.set_defaults({"trainer.max_steps": 4800})

    def fit(self, model: LightningModule, datamodule: VisionData | None = None, **kwargs) -> None:
        if not self.attack:
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
            return
        config = self.config_init[self.subcommand]
        client: Client = config["client"]
        report = next(cb for cb in self.trainer.callbacks if isinstance(cb, InversionReport))
        if config.get("update"):
            from .update_io import load_update

            model.set_target(load_update(config["update"], model.victim, kind=client.kind))
        else:
            images, labels = datamodule.attack_targets()  # the client's private batch, normalised
            model.set_target(client.update(model.victim, images, labels))
            report.set_ground_truth(denormalize(images, datamodule.mean, datamodule.std).clamp(0, 1), labels)
        self.trainer.fit(model, **kwargs)  # the attack sees the update only, not the data


def _attribute(name: str):
    def get(obj):
        value = getattr(obj, name)
        return tuple(value) if isinstance(value, list) else value

    get.__name__ = f"get_{name}"
    return get


def main(args: list[str] | None = None, model_class: type[LightningModule] = GradientInversion) -> InversionCLI | None:
    """Run the CLI (``args=None`` reads ``sys.argv``); a missing dataset, weights or a bad update exit with a message."""
    try:
        return InversionCLI(model_class, args=args)
    except _user_errors() as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        if args is not None:  # called from Python: let the caller see the exception
            raise
        sys.exit(2)
