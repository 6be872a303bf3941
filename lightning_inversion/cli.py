"""The command line of both scripts: ``invert.py`` (the attack) and ``train_victim.py`` (victim training)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path

import torch
from pytorch_lightning import LightningModule
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from .attack import TRUE_HALF_PRECISIONS, GradientInversion, TargetMismatchError
from .client import Client, Update
from .data import MissingDataError, VisionData
from .errors import InputError
from .images import denormalize
from .report import InversionReport

log = logging.getLogger(__name__)

# Errors that mean "something the user must provide is missing or wrong": a message, no traceback.
# (Lightning raises MisconfigurationException for Trainer options it refuses.)
USER_ERRORS: tuple[type[Exception], ...] = (
    MissingDataError,
    InputError,
    FileNotFoundError,
    MisconfigurationException,
)

# The attack's Trainer callbacks unless --trainer.callbacks says otherwise: a checkpoint of the whole run
# (last.ckpt) every 500 steps, and the learning rate among the logged scalars.
ATTACK_CALLBACKS: list[dict] = [
    {
        "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 500, "save_last": True},
    },
    {
        "class_path": "pytorch_lightning.callbacks.LearningRateMonitor",
        "init_args": {"logging_interval": "step"},
    },
]


def _user_errors() -> tuple[type[Exception], ...]:
    from .update_io import UpdateFileError
    from .victims import MissingWeightsError

    return (*USER_ERRORS, MissingWeightsError, UpdateFileError)


class InversionCLI(LightningCLI):
    """LightningCLI for a model trained on (``train_victim.py``) or attacking (``invert.py``) a VisionData.

    The data decides the image shape, the number of classes and the normalisation of the model, so nobody types
    them twice. For the attack, ``fit`` first lets the simulated client compute its update from the private
    batch, hands the update to the attack and the ground truth to the report, and only then runs the Trainer.

    The attack checkpoints itself (``last.ckpt`` every 500 steps, :data:`ATTACK_CALLBACKS`) and logs its learning
    rate. ``fit --ckpt_path PATH`` (or ``last``: the newest ``last*.ckpt`` under the run's root and checkpoint
    folders, whatever logger version wrote it) continues a run from the update saved in the checkpoint, without
    the private data; the ground truth is still loaded for the report when the data is there.
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
            parser.link_arguments(
                "data", "model.num_images", compute_fn=_attribute("batch_images"), apply_on="instantiate"
            )
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
            parser.set_defaults({"trainer.max_steps": 4800, "trainer.callbacks": ATTACK_CALLBACKS})

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # A value its type refuses (``--model.restarts 0``) becomes one line naming the option and what is allowed;
        # every other parser message passes through as the parser wrote it.
        written = io.StringIO()
        try:
            with contextlib.redirect_stderr(written):
                super().parse_arguments(parser, args)
        except SystemExit as exit:
            line = _type_error_line(written.getvalue()) if exit.code == 2 else None
            sys.stderr.write(line or written.getvalue())
            raise
        sys.stderr.write(written.getvalue())

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        trainer = self.config[self.subcommand].trainer
        self._check_trainer_options(trainer)
        if not self.attack:
            return
        # The default callbacks must not break a Trainer without checkpoints or without a logger.
        drop = set()
        if trainer.get("enable_checkpointing") is False:
            drop.add("ModelCheckpoint")
        if trainer.get("logger") is False or trainer.get("logger") == []:
            drop.add("LearningRateMonitor")
        callbacks = trainer.get("callbacks")
        if drop and isinstance(callbacks, list):
            trainer.callbacks = [cb for cb in callbacks if _class_name(cb) not in drop]

    def _check_trainer_options(self, trainer) -> None:
        """Refuse the Trainer options that cannot work, before anything is built (they are Lightning's, untyped)."""
        max_steps = trainer.get("max_steps")
        lowest = 0 if self.attack else -1
        if isinstance(max_steps, int) and max_steps < lowest:
            allowed = (
                "a number of steps >= 0" if self.attack else "a number of steps >= 0, or -1 for no limit"
            )
            raise InputError(f"--trainer.max_steps must be {allowed}, got {max_steps}")
        if self.attack and str(trainer.get("precision")) in TRUE_HALF_PRECISIONS:
            raise InputError(
                f"--trainer.precision {trainer.get('precision')} would hold the dummy images and the matching "
                "objective in half precision, where the cosine loss rounds to zero: use bf16-mixed, 16-mixed or "
                "32-true"
            )

    def fit(self, model: LightningModule, datamodule: VisionData | None = None, **kwargs) -> None:
        if not self.attack:
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
            return
        config = self.config_init[self.subcommand]
        client: Client = config["client"]
        report = next(cb for cb in self.trainer.callbacks if isinstance(cb, InversionReport))
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path == "last":
            kwargs["ckpt_path"] = ckpt_path = self.last_checkpoint() or "last"
        resuming = ckpt_path is not None and ckpt_path != "last"  # "last" with nothing saved starts afresh
        if config.get("update"):
            from .update_io import load_update

            path = config["update"]
            update = load_update(path, model.victim)
            if (
                "kind" not in update.meta["recorded"]
            ):  # a plain dict or list: the client options say what it is
                update.kind = client.kind
            # What the file records about how the update was made wins over options left at their defaults.
            model.client = client.matching(update, source=str(path), prefix="--client.")
            try:
                model.set_target(update)
            except InputError as error:
                raise InputError(f"{path}: {error}") from None
        elif resuming:
            special = (
                ckpt_path in ("best", "hpc")
                or "://" in str(ckpt_path)
                or str(ckpt_path).startswith("registry")
            )
            if not special:  # else the module takes the update from the checkpoint Lightning finds
                model.set_target(read_target_update(ckpt_path))
            self._ground_truth_if_available(model, datamodule, client, report)
        else:
            images, labels = datamodule.attack_targets()  # the client's private batch, normalised
            model.set_target(client.update(model.victim, images, labels))
            report.set_ground_truth(denormalize(images, datamodule.mean, datamodule.std).clamp(0, 1), labels)
        self.trainer.fit(model, **kwargs)  # the attack sees the update only, not the data

    def last_checkpoint(self) -> str | None:
        """The newest ``last*.ckpt`` of earlier runs, or ``None``.

        Lightning alone looks only in the checkpoint folder of the *new* run, which a versioned logger (the
        default) has just made empty; this searches every version under the root folder, the loggers' folders
        and the checkpoint callbacks' explicit folders.
        """
        roots = {Path(self.trainer.default_root_dir)}
        roots |= {Path(lg.save_dir) for lg in self.trainer.loggers if getattr(lg, "save_dir", None)}
        patterns = ["checkpoints/last*.ckpt", "*/checkpoints/last*.ckpt", "*/*/checkpoints/last*.ckpt"]
        found = [path for root in roots for pattern in patterns for path in root.glob(pattern)]
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                found += Path(callback.dirpath).glob("last*.ckpt")
        found = [path for path in found if path.is_file()]
        return str(max(found, key=lambda path: path.stat().st_mtime)) if found else None

    def _ground_truth_if_available(
        self, model: GradientInversion, datamodule: VisionData, client: Client, report: InversionReport
    ) -> None:
        """Give the report the private batch when the data is here and matches the checkpoint's update."""
        try:
            images, labels = datamodule.attack_targets()
        except (MissingDataError, FileNotFoundError, OSError, NotImplementedError) as error:
            log.info("resuming without the private data (%s): no metrics against ground truth", error)
            return
        if model.update is not None:
            update = client.update(model.victim, images, labels)
            same = len(update.tensors) == len(model.update.tensors) and all(
                a.shape == b.shape and torch.allclose(a, b.to(a), rtol=1e-4, atol=1e-7)
                for a, b in zip(update.tensors, model.update.tensors, strict=True)
            )
            if not same:
                log.warning(
                    "the data's private batch does not produce the checkpoint's update: no ground truth"
                )
                return
        report.set_ground_truth(denormalize(images, datamodule.mean, datamodule.std).clamp(0, 1), labels)


def read_target_update(path: str | os.PathLike) -> Update:
    """The update an attack checkpoint holds, read without unpickling code (``weights_only=True``).

    Raises:
        TargetMismatchError: the file is not a checkpoint of the attack.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "target_update" not in checkpoint:
        raise TargetMismatchError(f"{path} holds no target update: it is not a checkpoint of the attack")
    return Update.from_state_dict(checkpoint["target_update"])


def _class_name(callback) -> str:
    """The class name of a callback given as an object, a class path string or a ``class_path`` namespace."""
    path = getattr(callback, "class_path", None) or (callback if isinstance(callback, str) else None)
    if path is None and isinstance(callback, dict):
        path = callback.get("class_path")
    return str(path).rsplit(".", 1)[-1] if path else type(callback).__name__


# What the parser's constrained types allow, in words.
_ALLOWED = {
    "PositiveInt": "a whole number > 0",
    "NonNegativeInt": "a whole number >= 0",
    "PositiveFloat": "a number > 0",
    "NonNegativeFloat": "a number >= 0",
    "ClosedUnitInterval": "a number in [0, 1]",
    "OpenUnitInterval": "a number in (0, 1)",
}


def _type_error_line(output: str) -> str | None:
    """One line for a parser error about a value its constrained type refuses, or ``None`` for other errors.

    jsonargparse reports ``--data.image_size 0`` as the usage, then ``Parser key "data": ... Parser key
    "image_size": Not of type PositiveInt: 0 does not conform to restriction v>0`` over several lines.
    """
    error = output[output.rfind("error: Parser key") :] if "error: Parser key" in output else ""
    found = re.search(r"Not of type (\w+): (.*)", error)
    if found is None or found.group(1) not in _ALLOWED:
        return None
    keys = re.findall(r'Parser key "([^"]+)"', error[: found.start()])
    option = ".".join(k for i, k in enumerate(keys) if i == 0 or not k.startswith(keys[0] + "."))
    value = re.match(r"(.*?) does not conform", found.group(2))
    given = value.group(1) if value and value.group(1) else None
    if given is None:
        nested = re.search(r"Given value: (?:NestedArg\(key='[^']*', val=)?(.+?)\)?$", error, re.MULTILINE)
        given = nested.group(1).strip("'") if nested else None
    got = f", got {given}" if given else ""
    return f"error: --{option} must be {_ALLOWED[found.group(1)]}{got}\n"


class _attribute:  # noqa: N801 - used like a function; a class so that ddp_spawn can pickle the parser
    """``compute_fn`` of an argument link: the attribute ``name`` of the data (lists as tuples)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__name__ = f"get_{name}"

    def __call__(self, obj):
        value = getattr(obj, self.name)
        return tuple(value) if isinstance(value, list) else value


def _user_error(error: BaseException) -> BaseException | None:
    """``error`` or the user error behind it (jsonargparse wraps errors raised while instantiating a class)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, _user_errors()):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def main(
    args: list[str] | None = None,
    model_class: type[LightningModule] = GradientInversion,
    exit_on_error: bool | None = None,
) -> InversionCLI | None:
    """Run the CLI (``args=None`` reads ``sys.argv``).

    A user's mistake (an option out of range, missing data or weights, a bad update or image file) prints one line,
    ``error: ...``, and exits with status 2. ``exit_on_error`` (default: only when reading ``sys.argv``) says
    whether to exit like that; otherwise the line is printed and the exception raised to the caller.
    """
    try:
        return InversionCLI(model_class, args=args)
    except Exception as error:
        cause = _user_error(error)
        if cause is None:
            raise
        message = str(cause.args[0]) if isinstance(cause, KeyError) and cause.args else str(cause)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        if not (args is None if exit_on_error is None else exit_on_error):
            if cause is error:
                raise
            raise cause from None
        sys.exit(2)
