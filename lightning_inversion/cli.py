"""The command line of both scripts: ``invert.py`` (the attack) and ``train_victim.py`` (victim training)."""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import textwrap
from pathlib import Path

import torch
from jsonargparse import DefaultHelpFormatter
from pytorch_lightning import LightningModule
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from .attack import GradientInversion, TargetMismatchError, lightning_notices_silenced
from .client import Client, Update
from .data import MissingDataError, VisionData
from .images import denormalize
from .report import InversionReport

log = logging.getLogger(__name__)

# Errors that mean "something the user must provide is missing or wrong": a message, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (MissingDataError, TargetMismatchError, FileNotFoundError)

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


# Trainer options these scripts hardly need: accepted, named once in the usage note, not documented in --help.
UNLISTED_TRAINER_OPTIONS = (
    "accumulate_grad_batches",
    "barebones",
    "benchmark",
    "detect_anomaly",
    "enable_autolog_hparams",
    "fast_dev_run",
    "gradient_clip_algorithm",
    "gradient_clip_val",
    "inference_mode",
    "limit_predict_batches",
    "limit_test_batches",
    "limit_train_batches",
    "min_epochs",
    "min_steps",
    "model_registry",
    "overfit_batches",
    "plugins",
    "profiler",
    "reload_dataloaders_every_n_epochs",
    "sync_batchnorm",
    "use_distributed_sampler",
)
# The sections whose options are documented in full by ``--help``; the Trainer's show one sentence each.
OWN_SECTIONS = ("model", "data", "client", "report", "update")


class CompactHelpFormatter(DefaultHelpFormatter):
    """``--help`` that fits on a few screens: a one-line usage, one sentence per Trainer option, and no lists of
    every known subclass (``--OPTION.help CLASS`` shows the options of one class)."""

    def _format_usage(self, usage, actions, groups, prefix) -> str:
        positionals = [a for a in actions if not a.option_strings]
        if prefix == "":  # argparse asking for the prefix of the subcommands' prog: as it is
            return super()._format_usage(usage, positionals, groups, prefix)
        text = super()._format_usage(usage, positionals, groups, prefix)
        notes = ["--OPTION.help CLASS_PATH shows the options of a class an option takes."]
        if any(a.dest.startswith("trainer.") for a in actions):
            notes.append(
                "Accepted but not listed (Lightning's Trainer documentation has them): --trainer.NAME for NAME "
                + ", ".join(UNLISTED_TRAINER_OPTIONS)
                + "."
            )
        parser = _current_parser()
        links = [a.target[0] for a in getattr(parser, "_actions", []) if type(a).__name__ == "ActionLink"]
        if links:  # the targets of links are no options: say once where their values come from
            notes.append(f"Set from other options (linked): {', '.join(links)}.")
        usage = text.replace(self._prog, f"{self._prog} [options]", 1).rstrip("\n")
        return "\n".join([usage, *(textwrap.fill(n, self._width) for n in notes)]) + "\n\n"

    def _get_help_string(self, action: argparse.Action) -> str:
        if getattr(action, "_jsonargparse_preexpanded_help", False) or not action.option_strings:
            return super()._get_help_string(action)
        text = action.help or ""
        ours = action.dest.split(".", 1)[0] in OWN_SECTIONS
        if not ours:  # Lightning's own, long documentation: its first sentence
            text = _first_sentence(text)
        details = []
        type_text = self._get_type_str(action)
        plain = type_text in ("int", "float", "str") and action.default is not None  # the default shows it
        if ours and type_text and not plain and not type_text.startswith(("Literal[", "bool")):
            details.append("type: %(type)s")
        if action.default not in (argparse.SUPPRESS, None):
            long = len(str(action.default)) > 40  # e.g. the attack's callbacks: --print_config shows them
            details.append("default: see --print_config" if long else "default: %(default)s")
        return text + (f" ({', '.join(details)})" if details else "")

    def _format_action(self, action: argparse.Action) -> str:
        kind = type(action).__name__
        unlisted = action.dest.removeprefix("trainer.") in UNLISTED_TRAINER_OPTIONS
        if kind in ("_ActionHelpClassPath", "ActionLink") or unlisted:
            return ""  # said once, in the usage
        return super()._format_action(action)


def _current_parser() -> argparse.ArgumentParser | None:
    """The parser whose help is being formatted (jsonargparse keeps it in a context variable), if known."""
    try:
        from jsonargparse._common import parent_parser
    except ImportError:  # another jsonargparse layout: the help only loses the note on linked options
        return None
    return parent_parser.get()


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.search(r"(?<=[a-z0-9`)]\.)\s+(?=[A-Z`(])", text)
    return text[: match.start()] if match else text


class InversionArgumentParser(LightningArgumentParser):
    """The parser of both scripts: no abbreviated options, short help, and one-line errors.

    An unknown or abbreviated option is refused with the nearest valid name (``difflib``), in one message,
    exit status 2.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", CompactHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        help_command = parser.prog.replace(" [options]", "") + " --help"
        sys.stderr.write(f"error: {_explain(parser, message)} (all options: {help_command})\n")
        self.exit(2)


def _explain(parser: argparse.ArgumentParser, message: str) -> str:
    """The parser's message on one line; for an unknown option with the nearest valid name (``difflib``)."""
    message = " ".join(str(message).split())
    if re.search(r"Parser key \"model\.optimizer\".* Option 'lr' is not accepted", message):
        return "model.optimizer takes no lr: the optimiser's learning rate is --model.lr"
    parsers = [parser]  # with the subcommands' parsers, for an error the root parser reports
    for action in parser._actions:
        if isinstance(getattr(action, "choices", None), dict):
            parsers += [p for p in action.choices.values() if isinstance(p, argparse.ArgumentParser)]
    known = list(
        dict.fromkeys(o for p in parsers for a in p._actions for o in a.option_strings if o[:2] == "--")
    )
    match = re.search(r"unrecognized arguments: (--[\w.\-]+)", message)
    if match:
        return message + _nearest(match.group(1).split("=", 1)[0], known)
    match = re.search(r"Group '([\w.]+)' does not accept option '(\w+)'", message)
    if match:
        group, name = match.groups()
        return message + _nearest(f"--{group}.{name}", known)
    match = re.search(
        r"Parser key \"([\w.]+)\".*class_path '([\w.]+)': Option '(\w+)' is not accepted", message
    )
    if match:
        key, class_path, name = match.groups()
        short = class_path.rsplit(".", 1)[-1]
        return (
            f"{key} ({short}) takes no option {name!r}"
            + _nearest(name, _init_arguments(class_path), prefix=f"--{key}.")
            + f" (its options: --{key}.help {short})"
        )
    match = re.search(r"invalid choice: '(\S+)' \(choose from (.*)\)", message)
    if match:
        return message + _nearest(match.group(1), re.findall(r"'([^']+)'", match.group(2)))
    return message


def _nearest(name: str, candidates: list[str], prefix: str = "") -> str:
    """``; did you mean X?`` for the closest candidate (``difflib``), or ``''``."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _init_arguments(class_path: str) -> list[str]:
    """The ``__init__`` arguments of a class and of the bases its ``**kwargs`` reach."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [
            p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


class _NoTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _drop_lightning_tips() -> None:
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in logger.filters):
        logger.addFilter(_NoTips())


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
        kwargs.setdefault("parser_class", InversionArgumentParser)
        _drop_lightning_tips()
        super().__init__(model_class, VisionData, *args, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": "lightning_inversion.data.PhotoData"}})
        _describe_victims(parser, class_paths=self.attack)
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
            parser.set_defaults(
                {
                    "trainer.max_steps": 4800,
                    "trainer.callbacks": ATTACK_CALLBACKS,
                    "trainer.enable_model_summary": False,  # the victim's layers, not what the attack optimises
                }
            )

    # Lightning's notices that do not apply here (lightning_inversion.attack.LIGHTNING_NOTICES) are silenced while
    # the classes are built (the CSV logger where TensorBoard is not installed) and while a subcommand runs.
    def instantiate_classes(self) -> None:
        with lightning_notices_silenced():
            super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        with lightning_notices_silenced():
            super()._run_subcommand(subcommand)

    def before_instantiate_classes(self) -> None:
        if not self.attack or self.subcommand is None:
            return
        trainer = self.config[self.subcommand].trainer
        # The default callbacks must not break a Trainer without checkpoints or without a logger.
        drop = set()
        if trainer.get("enable_checkpointing") is False:
            drop.add("ModelCheckpoint")
        if trainer.get("logger") is False or trainer.get("logger") == []:
            drop.add("LearningRateMonitor")
        callbacks = trainer.get("callbacks")
        if drop and isinstance(callbacks, list):
            trainer.callbacks = [cb for cb in callbacks if _class_name(cb) not in drop]

    def fit(self, model: LightningModule, datamodule: VisionData | None = None, **kwargs) -> None:
        if not self.attack:
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
            message = checkpoint_message(self.trainer)
            if message:
                rank_zero_info(message)
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

            model.set_target(load_update(config["update"], model.victim, kind=client.kind))
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
            update = client.update(model.victim, images, labels)
            if not datamodule.labels_known:  # images without labels: the server is not told the client's
                update.labels = None
            model.set_target(update)
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


def _describe_victims(parser: LightningArgumentParser, class_paths: bool) -> None:
    """``--model.victim``'s help: the registered names, and (``class_paths``) how to give any ``nn.Module``."""
    from .victims import list_victims

    action = next((a for a in parser._actions if a.dest == "model.victim"), None)
    if action is None:
        return
    action.help = (
        "the shared model: a registered name, "
        + ", ".join(list_victims())
        + " (ConvNet-{width} and ResNet{depth}-{width} take other numbers too)"
        + (
            '; or any nn.Module as a class path, e.g. \'{"class_path": "torchvision.models.AlexNet", '
            '"init_args": {"num_classes": 10}}\'.'
            if class_paths
            else "."
        )
    )


def checkpoint_message(trainer) -> str | None:
    """Where victim training left its checkpoint, and how the attack takes it (``None`` without a checkpoint)."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    last, best = callback.last_model_path, callback.best_model_path
    path = last or best
    if not path:
        return None
    lines = [f"Victim checkpoint: {_short(path)}"]
    if best and last and best != last:
        lines.append(f"  best by {callback.monitor}: {_short(best)}")
    lines.append(
        f"  attack it: python invert.py fit --model.victim_checkpoint {_short(path)}, with the data it was "
        "trained on"
    )
    return "\n".join(lines)


def _short(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


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


class _attribute:  # noqa: N801 - used like a function; a class so that ddp_spawn can pickle the parser
    """``compute_fn`` of an argument link: the attribute ``name`` of the data (lists as tuples)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__name__ = f"get_{name}"

    def __call__(self, obj):
        value = getattr(obj, self.name)
        return tuple(value) if isinstance(value, list) else value


def main(
    args: list[str] | None = None, model_class: type[LightningModule] = GradientInversion
) -> InversionCLI | None:
    """Run the CLI (``args=None`` reads ``sys.argv``); a missing dataset, weights or a bad update exit with a message."""
    try:
        return InversionCLI(model_class, args=args)
    except _user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        if args is not None:  # called from Python: let the caller see the exception
            raise
        sys.exit(2)
