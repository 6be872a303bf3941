"""Evaluation over many targets: the protocol of Geiping et al. 2020's tables, one reconstruction per image.

Each target is one private image of a :class:`~lightning_inversion.data.VisionData`'s target split, attacked on
its own (one client, one image, as in the paper's Table 1): the simulated client computes its update, a fresh
:class:`~lightning_inversion.attack.GradientInversion` with the same options inverts it, and the result is
measured against the ground truth. Up to ``targets_per_fit`` targets share one fit: the attack's ``targets`` axis
optimises them together, batched like restarts, each against its own update and its restarts chosen on their own.

Outputs in ``output_dir``: ``evaluation.csv`` (one row per target), ``evaluation.md`` (mean ± std of each
metric), ``evaluation.png`` (every ground truth above its reconstruction) and ``evaluation.pt`` (the images). They
are rewritten as each target finishes, so a run stopped half-way keeps the targets done. A target whose image
cannot be read is skipped: its row names the error, and the others are kept.

The command line (``python evaluate.py --config configs/eval_photos.yaml``) reads the same sections as
``invert.py fit``: ``data``, ``model`` (the attack's options, victim included), ``client``, ``trainer`` and
``report`` (``output_dir``, ``lpips``); the data's ``target_indices`` (or its first ``num_images``) are the
targets, each attacked on its own.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from .attack import GradientInversion
from .cli import StopOnSignal
from .client import Client
from .data import VisionData
from .images import denormalize
from .metrics import LPIPSMetric, evaluate, summarize
from .notices import lightning_notices_silenced
from .report import InversionReport, OutputFolderError, check_writable, draw_rows
from .targets import attack_victim
from .threat_model import COLUMNS as THREAT_MODEL_COLUMNS

log = logging.getLogger(__name__)

COLUMNS = (
    "index",
    "label",
    "psnr",
    "ssim",
    "lpips",
    "mse",
    "feature_mse",
    "label_accuracy",
    "seconds",
    "chosen_restart",
    *THREAT_MODEL_COLUMNS,
    "error",
)
# Errors of reading one target's image (a corrupt or missing file) that skip that target, not the evaluation.
UNREADABLE = (OSError, ValueError, RuntimeError)
# What evaluation.md summarises, with the heading of each row.
SUMMARY = {
    "psnr": ("PSNR (dB)", ".2f"),
    "ssim": ("SSIM", ".3f"),
    "lpips": ("LPIPS", ".3f"),
    "label_accuracy": ("label accuracy", ".2f"),
    "seconds": ("seconds per target", ".2f"),
}
# Arguments of GradientInversion that the data (or the evaluation itself: one image per target) decides.
DECIDED = ("num_classes", "image_shape", "mean", "std", "num_images", "client")
# What evaluate_targets gives a Trainer unless trainer_kwargs say otherwise: quiet, one device, no files.
QUIET_TRAINER = dict(
    max_steps=4800,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    devices=1,
)


@dataclass
class Evaluation:
    """The outcome of :func:`evaluate_targets`.

    Attributes:
        rows: one dict per target with the keys of :data:`COLUMNS` (``None`` where a metric is unavailable);
            ``error`` says why a target was skipped (its image could not be read), else ``None``.
        summary: ``(mean, std)`` per metric of :data:`SUMMARY` over the targets.
        images: the reconstructions in [0, 1], ``(N, C, H, W)``, in target order, skipped targets left out.
        truth: the ground truths in [0, 1], ``(N, C, H, W)``, likewise.
        notes: remarks for the report (e.g. why LPIPS is unavailable).
    """

    rows: list[dict[str, Any]]
    summary: dict[str, tuple[float, float]]
    images: Tensor
    truth: Tensor
    notes: list[str] = field(default_factory=list)


def evaluate_targets(
    data: VisionData,
    victim: str | nn.Module = "ConvNet-16",
    targets: Sequence[int] | None = None,
    num_targets: int | None = None,
    attack_options: dict[str, Any] | None = None,
    client: Client | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    output_dir: str | Path | None = None,
    lpips: bool = True,
    targets_per_fit: int = 8,
) -> Evaluation:
    """Attack each target image on its own and measure every reconstruction (a loop over targets).

    Args:
        data: the dataset the targets come from (its target split, normalisation and number of classes).
        victim: the shared model: a registry name (built once, with ``pretrained``/``victim_weights`` from
            ``attack_options``) or an ``nn.Module`` (its ``requires_grad`` flags are turned off, as the attack
            does). A ``victim_checkpoint`` in ``attack_options`` replaces it: the clients and the attack both use
            the checkpoint's victim.
        targets: indices into the data's target split. ``None``: the first ``num_targets`` indices, or without
            that the data's own selection (``target_indices``, else ``num_images`` from ``start_index``).
        num_targets: how many targets when ``targets`` is not given.
        attack_options: :class:`~lightning_inversion.attack.GradientInversion` arguments (``restarts``,
            ``objective``, ``tv``, ``optimizer``, ``label_strategy``, ...), the same for every target. The data
            decides ``num_classes``, ``image_shape``, ``mean`` and ``std``; each target is one image.
        client: the client's protocol (FedSGD in eval mode by default).
        trainer_kwargs: Lightning ``Trainer`` arguments (``max_steps``, ``precision``, ``accelerator``, ...)
            over a quiet single-device default of 4,800 steps; a fresh Trainer runs each target.
        output_dir: where to write ``evaluation.csv``, ``evaluation.md``, ``evaluation.png`` and
            ``evaluation.pt``, after every target; ``None`` writes nothing. It is tried before the first target.
        lpips: measure LPIPS (AlexNet) where its weights can be had.
        targets_per_fit: how many targets one fit attacks at once (the attack's ``targets`` axis, batched like
            restarts; target t of a fit starts from the seeds of a separate run with seed ``seed + t·R``); the
            results are written as each fit finishes. 1: one fit per target.

    Returns:
        an :class:`Evaluation` with the rows, the summary and the images.

    Raises:
        OutputFolderError: ``output_dir`` cannot be written.
    """
    options = dict(attack_options or {})
    decided = sorted(set(options) & set(DECIDED))
    if decided:
        raise ValueError(
            f"{', '.join(decided)} are decided by the data and the evaluation, not attack options"
        )
    pretrained = options.pop("pretrained", False)
    victim_weights = options.pop("victim_weights", None)
    victim_checkpoint = options.pop("victim_checkpoint", None)
    victim = options.pop("victim", victim)
    victim_name = victim if isinstance(victim, str) else type(victim).__name__
    if victim_checkpoint is not None:
        victim_name = f"checkpoint {victim_checkpoint}"
    if isinstance(victim, str) or victim_checkpoint is not None:
        # One victim for the clients and the attack: the checkpoint's when given, else built from its name.
        victim = attack_victim(
            victim, data.num_classes, tuple(data.image_shape), tuple(data.mean), tuple(data.std), pretrained,
            victim_weights, victim_checkpoint,
        )  # fmt: skip
    client = client or Client()
    dataset = data.target_set()
    if targets is None:
        targets = list(range(num_targets)) if num_targets is not None else data.target_index_list(dataset)
    targets = [int(i) for i in targets]
    if not targets:
        raise ValueError("no targets to evaluate")
    bad = [i for i in targets if not 0 <= i < len(dataset)]
    if bad:
        raise ValueError(f"target indices {bad} are out of range for a split of {len(dataset)} images")
    settings = {**QUIET_TRAINER, **(trainer_kwargs or {})}
    if output_dir is not None:
        check_writable(output_dir, "output_dir")
    metric = LPIPSMetric() if lpips else None
    notes = [metric.reason] if metric is not None and metric.reason else []
    description = _describe(victim_name, data, options, settings, client)

    rows: list[dict[str, Any]] = []
    images, truths = [], []
    flags, was_training = [p.requires_grad for p in victim.parameters()], victim.training
    try:
        for start in range(0, len(targets), targets_per_fit):
            chunk, readable, skipped = targets[start : start + targets_per_fit], [], {}
            for position, index in enumerate(chunk):
                try:
                    readable.append((index, *dataset[index]))
                except UNREADABLE as error:  # this target only: the others are still worth their time
                    skipped[position] = _skipped(index, error)
                    log.error("target (index %d) skipped: %s", index, skipped[position]["error"])
            attacked = iter(_attack_chunk(data, victim, readable, options, client, settings, metric))
            for position in range(len(chunk)):  # in the order of the targets
                if position in skipped:
                    rows.append(skipped[position])
                    continue
                row, image, truth = next(attacked)
                rows.append(row)
                images.append(image)
                truths.append(truth)
                log.info(
                    "target %d/%d (index %d): PSNR %.2f dB, SSIM %.3f, %.1f s",
                    len(rows), len(targets), row["index"], row["psnr"], row["ssim"], row["seconds"],
                )  # fmt: skip
            done = start + len(chunk)
            if output_dir is not None and done < len(targets):  # what is done so far survives a stop
                pending = (
                    f"{len(targets) - done} of {len(targets)} targets still to run when this was written"
                )
                partial = _collect(rows, images, truths, [*notes, pending])
                write_evaluation(output_dir, partial, description)
    finally:  # the caller's model comes back as it was (the attack freezes it)
        for p, flag in zip(victim.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        victim.train(was_training)

    evaluation = _collect(rows, images, truths, notes)
    if output_dir is not None:
        write_evaluation(output_dir, evaluation, description)
    return evaluation


def _collect(
    rows: list[dict[str, Any]], images: list[Tensor], truths: list[Tensor], notes: list[str]
) -> Evaluation:
    """The evaluation of the rows so far: summary over the measured targets, notes on the failed ones."""
    notes = list(notes)
    measured = [row for row in rows if row["error"] is None]
    summary = {key: summarize([row[key] for row in measured]) for key in SUMMARY}
    failed = [row["index"] for row in measured if row["psnr"] is None or math.isnan(row["psnr"])]
    if failed:  # no finite restart (NaN images): left out of the means, and said so
        notes.append(f"{len(failed)} of {len(rows)} reconstructions failed (NaN), targets {failed}")
    for row in rows:
        if row["error"] is not None:
            notes.append(f"target {row['index']} was skipped, its image could not be read: {row['error']}")
    empty = torch.zeros(0)
    return Evaluation(
        rows, summary, torch.cat(images) if images else empty, torch.cat(truths) if truths else empty, notes
    )


def _skipped(index: int, error: BaseException) -> dict[str, Any]:
    """The row of a target whose image could not be read: no metrics, the error."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(index=index, error=" ".join(f"{type(error).__name__}: {error}".replace("|", "/").split()))
    return row


def _attack_chunk(
    data: VisionData,
    victim: nn.Module,
    items: list[tuple[int, Tensor, int]],
    options: dict[str, Any],
    client: Client,
    settings: dict[str, Any],
    metric: LPIPSMetric | None,
) -> list[tuple[dict[str, Any], Tensor, Tensor]]:
    """Some targets ``(index, image, label)`` in one fit: each client's update, one attack with a target axis, and
    each target's measurements (row, images, truth)."""
    if not items:
        return []
    device = next(victim.parameters()).device
    xs = [torch.as_tensor(image)[None] for _, image, _ in items]  # (1, C, H, W) each, normalised
    ys = [torch.tensor([int(label)]) for _, _, label in items]
    module = GradientInversion(
        victim,
        num_classes=data.num_classes,
        image_shape=tuple(data.image_shape),
        mean=tuple(data.mean),
        std=tuple(data.std),
        num_images=1,
        targets=len(items),
        client=client,
        **options,
    )
    module.set_targets(
        [client.update(victim, x.to(device), y.to(device)) for x, y in zip(xs, ys, strict=True)]
    )
    started = time.perf_counter()
    with _quiet_lightning():
        pl.Trainer(**settings).fit(module)
    wall = time.perf_counter() - started
    results = module.reconstructions or module.reconstruct_results()
    out = []
    for (index, _, label), x, y, result in zip(items, xs, ys, results, strict=True):
        truth = denormalize(x, data.mean, data.std).clamp(0, 1)
        measured = evaluate(result.images, truth, result.labels, y, victim, data.mean, data.std, metric)
        row = {
            "index": index,
            "label": int(label),
            "psnr": measured["psnr"],
            "ssim": measured["ssim"],
            "lpips": measured["lpips"],
            "mse": measured["mse"],
            "feature_mse": measured.get("feature_mse"),
            "label_accuracy": measured.get("label_accuracy"),
            "seconds": (result.seconds or wall) / len(items),  # the fit's time, shared by its targets
            "chosen_restart": result.chosen_restart,
            **{key: (result.threat_model or {}).get(key) for key in THREAT_MODEL_COLUMNS},
            "error": None,
        }
        out.append((row, result.images.float().cpu(), truth))
    return out


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Keep Lightning's per-fit banners (accelerator, tips) and notices out of a loop over many targets."""
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        with lightning_notices_silenced():
            yield
    finally:
        logger.setLevel(level)


def _describe(
    victim: str, data: VisionData, options: dict[str, Any], settings: dict[str, Any], client: Client
) -> str:
    parts = [f"victim {victim}", f"data {type(data).__name__} {tuple(data.image_shape)}"]
    parts.append(f"{settings.get('max_steps')} steps")
    if settings.get("precision") is not None:
        parts.append(f"precision {settings['precision']}")
    parts.append(f"client {client.protocol}")
    parts += [f"{k} {_name(v)}" for k, v in sorted(options.items())]
    return ", ".join(parts)


def _name(value: Any) -> Any:
    """A readable name for an option: a class's or function's name, also inside a ``functools.partial``."""
    if isinstance(value, functools.partial):
        classes = [a for a in (value.func, *value.args) if isinstance(a, type)]
        if classes:
            return classes[-1].__name__
    return getattr(value, "__name__", value)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_evaluation(folder: str | Path, evaluation: Evaluation, description: str = "") -> Path:
    """Write ``evaluation.csv``, ``evaluation.md``, ``evaluation.png`` and ``evaluation.pt`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "evaluation.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        writer.writerows([[_cell(row[key]) for key in COLUMNS] for row in evaluation.rows])
    (folder / "evaluation.md").write_text(evaluation_markdown(evaluation, description))
    if len(evaluation.images):
        save_pairs(folder / "evaluation.png", evaluation.images, evaluation.truth, rows=evaluation.rows)
    torch.save(
        {"images": evaluation.images, "truth": evaluation.truth, "rows": evaluation.rows},
        folder / "evaluation.pt",
    )
    return folder


def evaluation_markdown(evaluation: Evaluation, description: str = "") -> str:
    """The summary table (mean ± std over targets) and, for up to 32 targets, one row per target."""
    skipped = sum(row["error"] is not None for row in evaluation.rows)
    title = f"# Evaluation over {len(evaluation.rows) - skipped} targets"
    lines = [title + (f" ({skipped} skipped, see the notes)" if skipped else ""), ""]
    if description:
        lines += [description, ""]
    assumed = {
        tuple((key, row[key]) for key in THREAT_MODEL_COLUMNS)
        for row in evaluation.rows
        if row["error"] is None and row.get(THREAT_MODEL_COLUMNS[0]) is not None
    }
    for model in sorted(assumed, key=str):  # one, unless rows were made under different assumptions
        lines += ["Threat model: " + ", ".join(f"{key} {value}" for key, value in model), ""]
    lines += ["| metric | mean ± std |", "|---|---|"]
    for key, (title, spec) in SUMMARY.items():
        mean, std = evaluation.summary[key]
        lines.append(f"| {title} | {'n/a' if math.isnan(mean) else f'{mean:{spec}} ± {std:{spec}}'} |")
    if len(evaluation.rows) <= 32:
        lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += [
            "| " + " | ".join(_cell(row[k]) or ("" if k == "error" else "n/a") for k in COLUMNS) + " |"
            for row in evaluation.rows
        ]
    lines += [""] + [f"Note: {note}" for note in evaluation.notes]
    return "\n".join(lines).rstrip() + "\n"


def save_pairs(
    path: str | Path, images: Tensor, truth: Tensor, per_row: int = 8, rows: list[dict] | None = None
) -> None:
    """A PNG of up to ``per_row`` targets per band: ground truths above their reconstructions.

    With ``rows`` (the evaluation's, one per target) each ground truth is captioned with its target index and
    each reconstruction with its PSNR and SSIM. A failed (NaN) reconstruction shows black.
    """
    images = torch.nan_to_num(images.float(), nan=0.0).clamp(0, 1)
    truth_captions = reconstruction_captions = None
    if rows is not None:
        truth_captions = [f"target {row['index']}" for row in rows]
        reconstruction_captions = [
            "failed (NaN)"
            if row["psnr"] is None or math.isnan(row["psnr"])
            else f"PSNR {row['psnr']:.1f} dB\nSSIM {row['ssim']:.2f}"
            for row in rows
        ]
    draw_rows(
        path,
        [("ground truth", truth, truth_captions), ("reconstruction", images, reconstruction_captions)],
        per_row=per_row,
    )


# --- the command line ------------------------------------------------------------------------------------------
def add_attack_sections(parser: ArgumentParser, seed_help: str, data_help: str) -> None:
    """The sections of an ``invert.py fit`` config, for the scripts that run many attacks (evaluate, audit)."""
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config with the sections below.")
    parser.add_argument("--seed_everything", type=int | None, default=0, help=seed_help)
    parser.add_subclass_arguments(VisionData, "data", help=data_help)
    parser.set_defaults({"data": {"class_path": "lightning_inversion.data.PhotoData"}})
    parser.add_class_arguments(GradientInversion, "model", skip=set(DECIDED), instantiate=False)
    parser.add_class_arguments(Client, "client")
    parser.add_class_arguments(pl.Trainer, "trainer", instantiate=False, fail_untyped=False)
    parser.set_defaults({"trainer.max_steps": QUIET_TRAINER["max_steps"]})
    parser.add_class_arguments(InversionReport, "report", instantiate=False)


def build_parser() -> ArgumentParser:
    """The parser of ``evaluate.py``: the sections of an ``invert.py fit`` config."""
    parser = ArgumentParser(
        description="Attack every target image of a dataset on its own and tabulate PSNR, SSIM, LPIPS, label "
        "accuracy and time (the paper's evaluation protocol).",
        default_env=False,
    )
    add_attack_sections(
        parser,
        "Seed of the global random generators (an untrained victim's weights), as in invert.py.",
        "The dataset the targets come from.",
    )
    parser.add_argument(
        "--targets_per_fit",
        type=PositiveInt,
        default=8,
        help="How many targets one fit attacks at once (batched like restarts); results are written after each fit.",
    )
    return parser


def _changed(values: Namespace, defaults: Namespace) -> dict[str, Any]:
    """The entries of a parsed group that differ from the parser's defaults."""
    values, defaults = values.as_dict(), defaults.as_dict()
    return {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}


def main(args: list[str] | None = None) -> Evaluation:
    """Run ``evaluate.py`` (``args=None`` reads ``sys.argv``)."""
    parser = build_parser()
    config = parser.parse_args(args)
    defaults = parser.get_defaults()
    if config.seed_everything is not None:  # an untrained victim's weights come from the global generator
        pl.seed_everything(config.seed_everything, verbose=False)
    # Instantiates the data, the client and class paths inside the groups (optimizer, callbacks).
    init = parser.instantiate(config)
    # Only what the config changes reaches the attack and the Trainer, over their own (quiet) defaults.
    attack = {key: init.model[key] for key in _changed(config.model, defaults.model)}
    attack.pop("victim", None)
    trainer_kwargs = {key: init.trainer[key] for key in _changed(config.trainer, defaults.trainer)}
    trainer_kwargs["max_steps"] = config.trainer.max_steps
    output_dir = config.report.output_dir or "outputs/evaluation"
    try:
        check_writable(output_dir, "--report.output_dir")
    except OutputFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        if args is not None:  # called from Python: let the caller see the exception
            raise
        sys.exit(2)
    # SIGINT/SIGTERM stop the target being attacked after its current step; the finished targets are on disk.
    with StopOnSignal() as stop:
        trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), stop]
        try:
            evaluation = evaluate_targets(
                init.data,
                config.model.victim,
                attack_options=attack,
                client=init.client,
                trainer_kwargs=trainer_kwargs,
                output_dir=output_dir,
                lpips=config.report.lpips,
                targets_per_fit=config.targets_per_fit,
            )
        except (SIGTERMException, KeyboardInterrupt):  # a KeyboardInterrupt comes between two targets
            log.error("interrupted: the targets that finished are in %s", Path(output_dir).resolve())
            raise SystemExit(128 + (stop.signum or signal.SIGTERM)) from None
    log.info("wrote %s", Path(output_dir).resolve())
    return evaluation
