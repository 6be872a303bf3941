"""The command line of both scripts: ``invert.py`` (the attack) and ``train_victim.py`` (victim training)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import importlib
import inspect
import io
import logging
import math
import os
import re
import signal
import sys
import textwrap
import threading
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import DefaultHelpFormatter
from jsonargparse.typing import PositiveInt
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback, _InstantiatorFn
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.plugins.io.wrapper import _WrappingCheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from .attack import GradientInversion
from .checkpoints import (
    CHECKSUM_KEY,
    CheckpointError,
    checkpoint_checksum,
    local_path,
    read_checkpoint,
    write_atomically,
)
from .client import Client, Update
from .data import MissingDataError, VisionData
from .errors import InputError
from .images import denormalize
from .notices import TRUE_HALF_PRECISIONS, lightning_notices_silenced
from .report import InversionReport, OutputFolderError, check_writable

log = logging.getLogger(__name__)

# Errors that mean "something the user must provide is missing or wrong": a message, no traceback.
# (Lightning raises MisconfigurationException for Trainer options it refuses.)
USER_ERRORS: tuple[type[Exception], ...] = (
    MissingDataError,
    InputError,
    FileNotFoundError,
    MisconfigurationException,
    CheckpointError,
    OutputFolderError,
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
    rate. ``fit --ckpt_path PATH`` (a file or a URL) continues a run from the update saved in the checkpoint,
    without the private data; the ground truth is still loaded for the report when the data is there and gives
    that update. ``--ckpt_path last`` continues the newest readable checkpoint of the same run (same target
    update and configuration) under the run's root and checkpoint folders, whatever logger version wrote it.

    Checkpoints are read only with ``weights_only=True`` and checked against their checksum, and written
    atomically (:mod:`lightning_inversion.checkpoints`). Options that contradict a resumed checkpoint, or an
    ``--update`` that is not the update it attacks, are refused (:meth:`_parse_ckpt_path`).

    When the data deals its images to several clients (``data.images_per_client``), each client's update is a
    target: they are attacked ``--targets_per_fit`` per fit, each fit a fresh attack on the same victim
    (:meth:`attack_on`), and each target's outputs and the table are written as each fit finishes
    (:func:`~lightning_inversion.evaluation.attack_targets`). ``evaluation=True`` (``evaluate.py``) makes every
    image its own client unless the data says otherwise, writes the table even for one target, and by default runs
    without a logger and checkpoints, into ``outputs/evaluation``.

    Before anything is computed, every folder the run will write to is tried (exit 2 naming the folder and its
    option). SIGINT (Ctrl+C) and SIGTERM (preemption) stop the run after the step it is in, with a checkpoint and
    the outputs so far (:class:`StopOnSignal`); the process then exits with 130 or 143.
    """

    def __init__(self, model_class: type[LightningModule], *args, evaluation: bool = False, **kwargs) -> None:
        self.attack = issubclass(model_class, GradientInversion)
        # evaluate.py: each chosen image is its own client unless the data says otherwise, every target's outputs
        # and the table are written even for one target, no logger and no checkpoints by default.
        self.evaluation = evaluation and self.attack
        self.model_arguments: tuple[type, tuple, dict] | None = None  # how the parser built the attack
        self.evaluation_result = None  # the Evaluation of a run over several targets
        self._args = kwargs.get("args")  # parsed again when a resumed checkpoint sets defaults
        self.resumed_checkpoint: tuple[str, dict] | None = None  # (path, checkpoint) of --ckpt_path PATH
        if self.evaluation:  # without a logger (its default) config.yaml goes beside the outputs
            kwargs.setdefault("save_config_callback", _ConfigBesideOutputs)
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
            # The parser builds the attack on one target; the data's clients are attacked in fits of
            # targets_per_fit, each built by the CLI (attack_on).
            parser.link_arguments("data", "model.targets", compute_fn=_one_target, apply_on="instantiate")
            parser.add_argument(
                "--targets_per_fit",
                type=PositiveInt,
                default=8,
                help="How many targets (the data's clients, data.images_per_client) one fit attacks at once; "
                "each fit's results are written as it ends.",
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
            parser.add_argument(
                "--update_ground_truth",
                type=bool | None,
                default=None,
                help="With --update, compare with the data's private batch: always, never, or (null) when it "
                "makes --update.",
            )
            parser.set_defaults(
                {
                    "trainer.max_steps": 4800,
                    "trainer.callbacks": ATTACK_CALLBACKS,
                    "trainer.enable_model_summary": False,  # the victim's layers, not what the attack optimises
                }
            )
            if self.evaluation:
                parser.set_defaults(
                    {
                        "trainer.logger": False,
                        "trainer.enable_checkpointing": False,
                        "report.output_dir": "outputs/evaluation",
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

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        if not self.attack:
            return
        # Lightning's instantiator of the model, wrapped to remember the arguments: the CLI builds the attack again
        # for each fit over several targets (ArgumentParser.add_instantiator is deprecated in jsonargparse, and
        # LightningCLI's own call above uses it all the same).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.parser.add_instantiator(
                _RecordingInstantiator(self, _InstantiatorFn(cli=self, key="model")),
                self._model_class,
                subclasses=self.subclass_mode_model,
            )

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        trainer = self.config[self.subcommand].trainer
        self._check_trainer_options(trainer)
        if not self.attack:
            return
        update = self.config[self.subcommand].get("update")
        if update:  # named before the Trainer starts and the victim is built
            from .update_io import existing_update_file

            existing_update_file(update)
        data = self.config[self.subcommand].data
        if self.evaluation and "images_per_client" in data.get("init_args", {}):
            if data.init_args.images_per_client is None:  # evaluate.py: every image its own client
                data.init_args.images_per_client = 1
        # The default callbacks must not break a Trainer without checkpoints or without a logger.
        drop = set()
        if trainer.get("enable_checkpointing") is False:
            drop.add("ModelCheckpoint")
        if trainer.get("logger") is False or trainer.get("logger") == []:
            drop.add("LearningRateMonitor")
        callbacks = trainer.get("callbacks")
        if drop and isinstance(callbacks, list):
            trainer.callbacks = [cb for cb in callbacks if _class_name(cb) not in drop]

    def _parse_ckpt_path(self) -> None:
        """Read a resumed checkpoint safely and reconcile its hyper-parameters with the command line.

        Replaces LightningCLI's version, which parses the checkpoint's ``hyper_parameters`` as configuration (and so
        imports any class or function a crafted checkpoint names) and silently overrides the options given. Here
        the checkpoint is read once with :func:`~lightning_inversion.checkpoints.read_checkpoint` (local or remote,
        ``weights_only=True``, checksum verified) and handed to the Trainer later. Of its hyper-parameters only
        plain values (numbers, strings, booleans, lists of them) of plain-typed options are used: they become the
        defaults, so an option left out continues with the checkpoint's value and ``config.yaml`` records what
        ran; an option given (on the command line or in a config file) with another value is refused, naming it.
        A checkpoint naming anything else for an option (a class, a function) is refused without importing it.

        Raises:
            CheckpointError: the checkpoint is unreadable, corrupt or unsafe, or options contradict it.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or _found_by_lightning(ckpt_path):
            return
        checkpoint = read_checkpoint(ckpt_path)
        self.resumed_checkpoint = (str(ckpt_path), checkpoint)
        hparams = checkpoint.get("hyper_parameters")
        if not isinstance(hparams, dict):
            return
        parser = self._parser(subcommand)
        hints = {action.dest: getattr(action, "_typehint", None) for action in parser._actions}
        defaults = {}
        for key, value in hparams.items():
            option = f"model.{key}"
            # Lightning's own entries are skipped, and so are the values linked from the data (no type hint here):
            # those are compared with the checkpoint once the data has set them.
            if key.startswith("_") or hints.get(option) is None:
                continue
            if not _plain_value_of(hints[option], value):
                raise CheckpointError(
                    f"refused the checkpoint {ckpt_path}: its hyper-parameter {key} = {str(value)[:100]!r} is not a "
                    "plain value of --model." + key + " (a checkpoint never names code to import)"
                )
            defaults[option] = value
        if not defaults:
            return
        parser.set_defaults(defaults)
        self.parse_arguments(self.parser, self._args)  # now an option left out takes the checkpoint's value
        given = self.config[subcommand]
        differ = [
            f"--{option} {_shown(given[option])} (the checkpoint ran with {_shown(value)})"
            for option, value in defaults.items()
            if not _same_value(given[option], value)
        ]
        if differ:
            raise CheckpointError(
                f"options contradict the checkpoint {ckpt_path}: {'; '.join(differ)}. Leave them out to continue "
                "with the checkpoint's values, or start a new run without --ckpt_path"
            )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The Trainer, reading and writing checkpoints through :class:`SafeCheckpointIO`.

        Raises:
            InputError: a Trainer option Lightning refuses with a ``ValueError`` (``num_nodes 0``, ...).
        """
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ValueError as error:
            raise InputError(f"--trainer options: {error}") from None
        return _with_safe_checkpoints(trainer)

    def trainer_for_targets(self, first: bool) -> Trainer:
        """The Trainer of one fit over several targets: the CLI's for the first, a fresh one (same options,
        callbacks and loggers, so one log folder) for the next; without checkpoints, since such a run is not
        continued (its finished targets are kept)."""
        if first:
            trainer = self.trainer
        else:
            config = dict(self._get(self.config_init, "trainer", default={}))
            config["callbacks"] = [
                cb
                for cb in config.get("callbacks") or []
                # config.yaml is written once; checkpoints are not
                if not isinstance(cb, SaveConfigCallback | StopOnSignal | ModelCheckpoint)
            ]
            config["logger"] = list(self.trainer.loggers) or False
            config["enable_checkpointing"] = False
            trainer = _with_safe_checkpoints(self.trainer_class(**config))
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, ModelCheckpoint)]
        return trainer

    def attack_on(self, targets: int, first_target: int) -> GradientInversion:
        """A fresh attack with the options of the CLI's on ``targets`` targets and its victim (the very module:
        one victim for every client and every fit); target t starts where a run with ``seed + (first_target +
        t)·R`` starts."""
        if self.model_arguments is None:
            raise RuntimeError(
                "the attack's arguments were not recorded (load_from_checkpoint_support=False)"
            )
        class_type, args, kwargs = self.model_arguments
        template = self.model
        kwargs = copy.deepcopy(kwargs)
        kwargs.update(
            victim=template.victim,
            victim_weights=None,
            victim_checkpoint=None,
            pretrained=False,
            targets=targets,
            seed=int(kwargs.get("seed", 0)) + first_target * template.restarts,
        )
        return class_type(*args, **kwargs)

    def _hand_over(self, path: str, checkpoint: dict) -> None:
        """Give the Trainer the checkpoint already read, so that it is not read (or downloaded) again."""
        io = self.trainer.strategy.checkpoint_io
        io = io.checkpoint_io if isinstance(io, _WrappingCheckpointIO) else io
        io.prime(path, checkpoint)

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
        resumed = self.resumed_checkpoint
        if not self.attack:
            if resumed is not None:
                _check_hyperparameters(model, *resumed)
                self._hand_over(*resumed)
            self.trainer.fit(model, datamodule=datamodule, **kwargs)
            message = checkpoint_message(self.trainer)
            if message:
                rank_zero_info(message)
            return
        config = self.config_init[self.subcommand]
        client: Client = config["client"]
        report = next(cb for cb in self.trainer.callbacks if isinstance(cb, InversionReport))
        for folder, option in self.output_folders(report).items():
            check_writable(folder, option)
        if self.evaluation or datamodule.num_targets > 1:  # the data deals its images to several clients
            from .evaluation import attack_targets

            self.evaluation_result = attack_targets(self, datamodule, report, kwargs.get("ckpt_path"))
            return
        ckpt_path = kwargs.get("ckpt_path")
        given = None
        if config.get("update"):
            from .update_io import load_update

            path = config["update"]
            # A plain dict or list: the client options say what it is.
            given = load_update(path, model.victim, default_kind=client.kind)
            given.meta.setdefault("image_shape", list(model.image_shape))
            # What the file records about how the update was made wins over options left at their defaults.
            model.client = client = client.matching(given, source=str(path), prefix="--client.")
            given, client = _server_view(given, client, model, str(path))
            model.client = client
        if ckpt_path is None:
            if given is not None:
                try:
                    model.set_target(given)
                except InputError as error:
                    raise InputError(f"{config['update']}: {error}") from None
                truth = self._ground_truth_of(
                    given, client, model, datamodule, config.get("update_ground_truth")
                )
                if truth is not None:
                    report.set_ground_truth(*truth)
            else:
                images, labels = datamodule.attack_targets()  # the client's private batch, normalised
                model.set_target(_client_update(client, model, datamodule, images, labels))
                report.set_ground_truth(
                    denormalize(images, datamodule.mean, datamodule.std).clamp(0, 1), labels
                )
        elif ckpt_path == "last" or resumed is not None:
            private = self._private_batch(datamodule) if given is None else None
            target = given if private is None else _client_update(client, model, datamodule, *private)
            if ckpt_path == "last":
                resumed = self.last_checkpoint(model, target)
                if resumed is None:
                    if target is None:
                        datamodule.attack_targets()  # raises why the private batch is missing
                    rank_zero_warn("--ckpt_path last: no checkpoint saved yet, starting a new run")
                    kwargs["ckpt_path"] = None
                    self.config[self.subcommand].ckpt_path = None
                else:
                    kwargs["ckpt_path"] = resumed[0]
                    self.config[self.subcommand].ckpt_path = resumed[0]  # config.yaml records what ran
            if resumed is not None:
                path, checkpoint = resumed
                stored = _stored_update(path, checkpoint)
                reason = _other_run(model, checkpoint, target=None, named=True)
                if reason is not None:
                    raise CheckpointError(f"{path} cannot be continued by this run: {reason}")
                if given is not None and not _same_update(given, stored):
                    raise CheckpointError(
                        f"--update {config['update']} is not the update the checkpoint {path} attacks: leave out "
                        "--update to continue that attack, or start a new run without --ckpt_path"
                    )
                target = stored
                self._hand_over(path, checkpoint)
            model.set_target(target)
            if private is not None:
                images, labels = private
                if _same_update(_client_update(client, model, datamodule, images, labels), target):
                    report.set_ground_truth(
                        denormalize(images, datamodule.mean, datamodule.std).clamp(0, 1), labels
                    )
                else:
                    log.warning(
                        "the data's private batch does not produce the checkpoint's update: no ground truth"
                    )
        else:  # best, hpc, registry: Lightning finds the checkpoint, the module takes the update from it
            private = self._private_batch(datamodule)
            if private is not None:
                images, labels = private
                report.set_ground_truth(
                    denormalize(images, datamodule.mean, datamodule.std).clamp(0, 1), labels
                )
        with StopOnSignal() as stop:
            self.trainer.callbacks.append(stop)
            try:
                self.trainer.fit(model, **kwargs)  # the attack sees the update only, not the data
            except SIGTERMException:  # the report has saved the checkpoint and the outputs
                raise SystemExit(128 + (stop.signum or signal.SIGTERM)) from None

    def output_folders(self, report: InversionReport) -> dict[Path, str]:
        """The folders this run writes to, known before it starts, each with the option that chose it."""
        trainer = self.trainer
        folders: dict[Path, str] = {}
        if report.output_dir is not None:
            folders[Path(report.output_dir)] = "--report.output_dir"
        if trainer.loggers or trainer.checkpoint_callbacks:  # their folders default to the root folder
            folders.setdefault(Path(trainer.default_root_dir), "--trainer.default_root_dir")
        for logger in trainer.loggers:
            if getattr(logger, "save_dir", None):
                folders.setdefault(Path(logger.save_dir), "--trainer.logger's save_dir")
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                folders.setdefault(Path(callback.dirpath), "--trainer.callbacks' ModelCheckpoint dirpath")
        return folders

    def last_checkpoint(self, model: GradientInversion, target: Update | None) -> tuple[str, dict] | None:
        """The newest readable checkpoint of this same run, read and verified, or ``None`` if none was saved.

        Lightning alone looks only in the checkpoint folder of the *new* run, which a versioned logger (the
        default) has just made empty; this searches every version under the root folder, the loggers' folders
        and the checkpoint callbacks' explicit folders, newest first (``last*.ckpt`` before a step checkpoint of
        the same time). An unreadable or corrupt checkpoint (a write cut short) is skipped with a warning, so the
        newest readable one is resumed.

        A checkpoint continues this run when its hyper-parameters, victim weights, client protocol and optimiser
        equal this run's and its target update is this run's (``target``: the ``--update`` file, or the client's
        update of the private batch). Without the private data and without ``--update`` the target is unknown:
        then the checkpoints that match otherwise must all attack one and the same update, else nothing is
        resumed (the same configuration may have attacked several targets; choose one with ``--ckpt_path``).

        Raises:
            CheckpointError: checkpoints exist but none continues this run; the message lists them and why.
        """
        roots = {Path(self.trainer.default_root_dir)}
        roots |= {Path(lg.save_dir) for lg in self.trainer.loggers if getattr(lg, "save_dir", None)}
        patterns = ["checkpoints/*.ckpt", "*/checkpoints/*.ckpt", "*/*/checkpoints/*.ckpt"]
        found = {path.resolve() for root in roots for pattern in patterns for path in root.glob(pattern)}
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                found |= {path.resolve() for path in Path(callback.dirpath).glob("*.ckpt")}
        found = sorted(
            (path for path in found if path.is_file()),
            key=lambda path: (path.stat().st_mtime, path.name.startswith("last")),
            reverse=True,
        )
        if not found:
            return None
        rejected, unreadable, chosen = [], [], None
        for path in found:
            try:
                checkpoint = read_checkpoint(path)
            except CheckpointError as error:
                log.warning("--ckpt_path last: skipping %s: %s", path, error)
                unreadable.append(path)
                rejected.append(f"{path} (unreadable or corrupt)")
                continue
            reason = _other_run(model, checkpoint, target)
            if reason is None and target is None and chosen is not None:
                if not _same_update(_stored_update(path, checkpoint), _stored_update(*chosen)):
                    raise CheckpointError(
                        f"--ckpt_path last: without the private data (or --update) the target is unknown, and "
                        f"{chosen[0]} and {path} attack different updates with this configuration: choose one "
                        "with --ckpt_path PATH"
                    )
            elif reason is None and chosen is None:
                chosen = (str(path), checkpoint)
                if target is not None:
                    break
            elif reason is not None:
                rejected.append(f"{path} ({reason})")
        if chosen is None:
            raise CheckpointError(
                "--ckpt_path last: no checkpoint of this run (same target update and configuration); found "
                + "; ".join(rejected)
                + ". Resume one with --ckpt_path PATH and its options, or start a new run without --ckpt_path"
            )
        if unreadable:
            rank_zero_warn(
                f"--ckpt_path last: {', '.join(map(str, unreadable))} could not be read; resuming from the newest "
                f"readable checkpoint of this run, {chosen[0]}"
            )
        if target is None:
            rank_zero_warn(
                f"resuming {chosen[0]} without the private data or --update: its target update is not checked"
            )
        return chosen

    def _ground_truth_of(
        self,
        given: Update,
        client: Client,
        model: GradientInversion,
        datamodule: VisionData,
        wanted: bool | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The data's private batch (pixels in [0, 1], labels) as the ground truth of an ``--update``, or ``None``.

        ``wanted`` (``--update_ground_truth``): ``True`` always, ``False`` never, ``None`` when the client's update
        of the private batch reproduces ``given`` (cosine >= 0.999 over all tensors): the images it was made from.
        """
        if wanted is False:
            return None
        private = self._private_batch(datamodule)
        if private is None:
            if wanted:
                datamodule.attack_targets()  # raises why the private batch is missing
            return None
        images, labels = private
        if images.shape[0] != model.num_images:
            if wanted:
                raise InputError(
                    f"--update_ground_truth: the data's private batch has {images.shape[0]} images, the update "
                    f"{model.num_images}"
                )
            return None
        simulated = client.update(model.victim, images, labels)
        cosine = _cosine(simulated.tensors, given.tensors)
        reproduced = cosine >= 0.999
        if wanted is None and not reproduced:
            log.info("the data's private batch does not make --update (cosine %.4f): no ground truth", cosine)
            return None
        if not reproduced:
            rank_zero_warn(
                f"--update_ground_truth: the client's update of the data's private batch is not --update (cosine "
                f"{cosine:.4f}); the metrics compare with those images anyway"
            )
        else:
            rank_zero_info(
                f"--update is the client's update of the data's private batch (cosine {cosine:.6f})"
            )
        return denormalize(images, datamodule.mean, datamodule.std).clamp(0, 1), labels

    def _private_batch(self, datamodule: VisionData) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The client's private batch (normalised images, labels), or ``None`` if the data is not here."""
        try:
            return datamodule.attack_targets()
        except (MissingDataError, FileNotFoundError, OSError, NotImplementedError) as error:
            log.info("resuming without the private data (%s): no metrics against ground truth", error)
            return None


class StopOnSignal(Callback):
    """SIGINT (Ctrl+C) and SIGTERM (preemption) stop an attack after the step it is in, keeping its work.

    The first signal is noted; at the end of the step every process learns of it (under DDP from one small
    all-reduce a step, so all stop after the same step, whichever process got the signal) and raises Lightning's
    ``SIGTERMException``. The report then saves ``last.ckpt`` and the outputs of the best restarts so far
    (:meth:`InversionReport.on_exception`), and :class:`InversionCLI` exits with 128 + the signal's number. A
    second Ctrl+C stops at once, without saving; so does a signal before the first step, with nothing to save.

    Use it as a context manager around ``Trainer.fit`` and as one of that Trainer's callbacks, in the main thread
    (elsewhere it changes nothing). While the steps run it takes SIGTERM from Lightning, whose own handler runs a
    collective inside the handler and can deadlock DDP processes that are in another one.

    Attributes:
        signum: the first signal received, or ``None``.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._stepping = False

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __getstate__(self) -> dict:  # ddp_spawn pickles the callbacks: handlers stay with their process
        return {**self.__dict__, "_previous": {}}

    def on_train_start(self, trainer, pl_module) -> None:
        self._stepping = True
        if self._previous:  # Lightning has just put its SIGTERM handler in; its teardown puts this one back
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.signum is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise SIGTERMException

    def on_train_end(self, trainer, pl_module) -> None:
        self._stepping = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stepping = False

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if not self._stepping:  # nothing to keep
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        again = " (Ctrl+C again stops at once, keeping nothing more)" if signum == signal.SIGINT else ""
        rank_zero_info(f"{signal.Signals(signum).name}: stopping after this step{again}")


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


def _client_update(
    client: Client,
    model: GradientInversion,
    datamodule: VisionData,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> Update:
    """The client's update of its private batch; without labels when the data has none to tell the server."""
    update = client.update(model.victim, images, labels)
    if not datamodule.labels_known:  # images without labels: the server is not told the client's
        update.labels = None
    return update


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The cosine between two updates, all tensors as one vector."""
    x = torch.cat([t.detach().double().cpu().reshape(-1) for t in a])
    y = torch.cat([t.detach().double().cpu().reshape(-1) for t in b])
    return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-300))


def _server_view(
    update: Update, client: Client, model: GradientInversion, path: str
) -> tuple[Update, Client]:
    """The ``--update`` as the server sees it, with the global weights it sent (the victim's), and its client.

    The update must come from the victim's weights when it records which (a Flower round's digest); a ``weights``
    update needs the global weights (``--model.victim_weights``, ``--model.victim_checkpoint`` or
    ``--model.pretrained``) and becomes the change of weights, which the client then sends (the cosine of new
    weights with any near copy of the global weights is about 1: no signal). A kind the update does not look like
    is refused (:func:`~lightning_inversion.update_io.kind_problem`).
    """
    from .update_io import as_change, kind_problem, victim_digests

    digest = update.meta.get("global_digest")
    hparams = model.hparams
    if digest is not None and digest not in victim_digests(model.victim):
        where = update.meta.get("global_weights")
        hint = f" (its round's {where}, beside it)" if where else ""
        raise InputError(
            f"{path} was computed from other global weights than the victim's: give the global weights the "
            f"server sent{hint} as --model.victim_weights"
        )
    known = digest is not None or any(
        hparams.get(k) for k in ("victim_weights", "victim_checkpoint", "pretrained")
    )
    if update.kind == "weights" and not known:
        raise InputError(
            f"{path} holds new weights (kind 'weights'): the server's global weights are needed to see the change "
            "the client made; give them as --model.victim_weights (or --model.victim_checkpoint)"
        )
    problem = kind_problem(update, model.victim)
    if problem is not None:
        raise InputError(f"{path}: {problem}")
    if update.kind != "weights":
        return update, client
    return as_change(update, model.victim), Client(**{**client.options(), "send": "delta"})


def read_target_update(path: str | os.PathLike) -> Update:
    """The update an attack checkpoint holds, read without unpickling code (``weights_only=True``).

    Raises:
        CheckpointError: the file is unreadable, corrupt, or not a checkpoint of the attack.
    """
    return _stored_update(str(path), read_checkpoint(path))


def _stored_update(path: str, checkpoint: dict) -> Update:
    """The target update saved in an attack checkpoint."""
    state = checkpoint.get("target_update")
    try:
        return Update.from_state_dict(state)
    except TypeError:
        raise CheckpointError(
            f"{path} holds no target update: it is not a checkpoint of the attack"
        ) from None


def _same_update(a: Update, b: Update) -> bool:
    """Whether two updates are the same up to floating-point noise (the same client step recomputed)."""
    if a.kind != b.kind or len(a.tensors) != len(b.tensors):
        return False
    if (a.labels is None) != (b.labels is None) or (
        a.labels is not None and not torch.equal(a.labels, b.labels)
    ):
        return False
    return all(
        x.shape == y.shape and torch.allclose(x, y.to(x), rtol=1e-4, atol=1e-7)
        for x, y in zip(a.tensors, b.tensors, strict=True)
    )


def _hyperparameter_differences(model: LightningModule, checkpoint: dict) -> list[str]:
    """``name: this run's value vs the checkpoint's`` for every hyper-parameter both know and that differ."""
    saved = checkpoint.get("hyper_parameters")
    saved = saved if isinstance(saved, dict) else {}
    mine = dict(model.hparams)
    return [
        f"{key} {_shown(mine[key])} here, {_shown(value)} in the checkpoint"
        for key, value in saved.items()
        if not key.startswith("_") and key in mine and not _same_value(mine[key], value)
    ]


def _check_hyperparameters(model: LightningModule, path: str, checkpoint: dict) -> None:
    """Refuse to continue a checkpoint whose hyper-parameters (those set from the data included) differ."""
    differ = _hyperparameter_differences(model, checkpoint)
    if differ:
        raise CheckpointError(
            f"{path} cannot be continued by this run: {'; '.join(differ)} (num_classes, image_shape, mean, std "
            "and num_images come from the data)"
        )


def _other_run(
    model: GradientInversion, checkpoint: dict, target: Update | None, named: bool = False
) -> str | None:
    """Why an attack checkpoint is not of this run (``None``: it is); ``target``: this run's update if known.

    A checkpoint the user ``named`` (``--ckpt_path PATH``) that records no run identity (written by an earlier
    version) is accepted with a warning; ``--ckpt_path last`` never picks one.
    """
    if "target_update" not in checkpoint:
        return "not a checkpoint of the attack"
    differ = _hyperparameter_differences(model, checkpoint)
    if differ:
        return "; ".join(differ)
    identity = checkpoint.get("attack_identity")
    if not isinstance(identity, dict):
        if not named:
            return "it records no victim, client or optimiser to compare with"
        log.warning(
            "the checkpoint records no victim, client or optimiser: they are not checked against this run"
        )
        identity = model.run_identity()
    mine = model.run_identity()
    if identity.get("victim") != mine["victim"]:
        return "other victim weights"
    if not _same_value(identity.get("client"), mine["client"]):
        return f"another client protocol ({identity.get('client')} there, {mine['client']} here)"
    if identity.get("optimizer") != mine["optimizer"]:
        return f"another optimizer ({identity.get('optimizer')} there, {mine['optimizer']} here)"
    for part, described in mine["parts"].items():
        theirs = identity.get("parts", {}).get(part, described)
        if not _same_value(theirs, described):
            return f"another {part} ({_part_shown(theirs)} there, {_part_shown(described)} here)"
    if target is not None and not _same_update(_stored_update("", checkpoint), target):
        return "another target update"
    return None


def _found_by_lightning(ckpt_path) -> bool:
    """Whether ``--ckpt_path`` is a keyword Lightning (or :meth:`InversionCLI.last_checkpoint`) resolves."""
    return ckpt_path in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")


def _plain_value_of(hint, value) -> bool:
    """Whether ``value`` is a plain value (number, string, boolean, None, list of them) of a plain part of ``hint``.

    A value that could only be read as a class or function of ``hint`` (which the parser would import) is not.
    """
    if hint is None:
        return False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_plain_value_of(h, value) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(hint))
    if origin in (tuple, list):
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(map(_plain_value_of, args, value))
        return all(_plain_value_of(args[0] if args else int | float | str | bool, v) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(hint, type):
        if issubclass(hint, bool):
            return isinstance(value, bool)
        if issubclass(hint, float):
            return isinstance(value, int | float) and not isinstance(value, bool)
        if issubclass(hint, int | str):
            return isinstance(value, hint.__mro__[-2]) and not isinstance(value, bool)
        if hint.__module__ == "jsonargparse.typing":  # path types (Path_fr, ...): a plain string
            return isinstance(value, str)
    return False


def _same_value(a, b) -> bool:
    """Equality of configuration values, lists and tuples alike, floats to 1e-9 relative."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(_same_value, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool | str):
        return type(a) is not bool and type(b) is not bool and math.isclose(a, b, rel_tol=1e-9, abs_tol=0)
    return type(a) is type(b) and a == b


def _part_shown(described) -> str:
    """A part's description (``{"class_path": ..., "init_args": ...}``, or a list of them) in one line."""
    if isinstance(described, list):
        return "[" + ", ".join(map(_part_shown, described)) + "]"
    options = ", ".join(f"{k}={_shown(v)}" for k, v in described.get("init_args", {}).items())
    return f"{described.get('class_path', '?').rsplit('.', 1)[-1]}({options})"


def _shown(value) -> str:
    return str(list(value) if isinstance(value, tuple) else value)


class SafeCheckpointIO(TorchCheckpointIO):
    """The Trainer's checkpoint plugin: checksummed atomic writes, reads with ``weights_only=True`` only.

    ``prime(path, checkpoint)`` hands over a checkpoint the CLI has already read and checked, so the Trainer does
    not read (or download) it a second time.
    """

    def __init__(self) -> None:
        super().__init__()
        self._primed: dict[str, dict] = {}

    def prime(self, path: str | os.PathLike, checkpoint: dict) -> None:
        self._primed = {str(path): checkpoint}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        checkpoint[CHECKSUM_KEY] = checkpoint_checksum(checkpoint)
        local = local_path(path)
        if local is None:
            super().save_checkpoint(checkpoint, path)
        else:
            write_atomically(lambda f: torch.save(checkpoint, f), local)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        checkpoint = self._primed.pop(str(path), None)
        return checkpoint if checkpoint is not None else read_checkpoint(path)


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
    "Percent": "a percentage in (0, 100]",  # lightning_inversion.defenses
    "Bits": "a whole number from 1 to 16",
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
        nested = re.search(r"Given value: (?:NestedArg\(key='[^']*', val=)?'?([^'\s)]+)", error)
        given = nested.group(1) if nested else None
    got = f", got {given}" if given else ""
    return f"error: --{option} must be {_ALLOWED[found.group(1)]}{got}\n"


def _with_safe_checkpoints(trainer: Trainer) -> Trainer:
    """``trainer``, reading and writing checkpoints through :class:`SafeCheckpointIO`.

    Raises:
        CheckpointError: another checkpoint plugin was chosen.
    """
    strategy = trainer.strategy
    io = strategy.checkpoint_io
    if isinstance(io, _WrappingCheckpointIO):
        if io.checkpoint_io is None or type(io.checkpoint_io) is TorchCheckpointIO:
            io._checkpoint_io = SafeCheckpointIO()  # the setter keeps a base IO already set
        io = io.checkpoint_io
    elif type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = io = SafeCheckpointIO()
    if not isinstance(io, SafeCheckpointIO):
        raise CheckpointError(
            f"the checkpoint plugin {type(io).__name__} is not supported (--trainer.plugins, "
            "--trainer.strategy): checkpoints are read only with weights_only=True through SafeCheckpointIO"
        )
    return trainer


class _ConfigBesideOutputs(SaveConfigCallback):
    """``config.yaml`` of ``evaluate.py``: in the log folder with a logger; without one (its default) beside the
    outputs in ``report.output_dir``, rewritten by each run there, instead of in the working directory."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        report = next((cb for cb in trainer.callbacks if isinstance(cb, InversionReport)), None)
        if trainer.loggers or report is None or report.output_dir is None or self.already_saved:
            super().setup(trainer, pl_module, stage)
            return
        if trainer.is_global_zero:
            folder = Path(report.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            path = str(folder / self.config_filename)
            self.parser.save(self.config, path, skip_unset=False, overwrite=True, multifile=self.multifile)
        self.already_saved = True


class _RecordingInstantiator:
    """Builds the attack as LightningCLI does (``inner``) and keeps the arguments in ``cli.model_arguments``."""

    def __init__(self, cli: InversionCLI, inner: _InstantiatorFn) -> None:
        self.cli, self.inner = cli, inner

    def __call__(self, class_type: type, *args, applied_instantiation_links: dict, **kwargs):
        # A copy of the parts before any fit binds them (to a target update, a device, a process group).
        pristine = copy.deepcopy({k: v for k, v in kwargs.items() if k != "victim"})
        self.cli.model_arguments = (class_type, args, pristine)
        return self.inner(
            class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs
        )


def _one_target(data: VisionData) -> int:
    """``compute_fn`` of the link to ``model.targets``: the parser's attack is on one target (the CLI builds the
    attacks on several, :meth:`InversionCLI.attack_on`)."""
    return 1


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
    evaluation: bool = False,
) -> InversionCLI | None:
    """Run the CLI (``args=None`` reads ``sys.argv``).

    A user's mistake (an option out of range, missing data or weights, a bad update or image file) prints one line,
    ``error: ...``, and exits with status 2. ``exit_on_error`` (default: only when reading ``sys.argv``) says
    whether to exit like that; otherwise the line is printed and the exception raised to the caller.
    ``evaluation``: run as ``evaluate.py`` (:class:`InversionCLI`).
    """
    try:
        return InversionCLI(model_class, args=args, evaluation=evaluation)
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
