"""Evaluation over many targets: the protocol of Geiping et al. 2020's tables, one reconstruction per client.

The data's chosen images are dealt out to clients (``data.images_per_client``; 1: each image its own client, as in
the paper's Table 1); each client computes its own update and is one target. ``invert.py fit`` (and
``evaluate.py``, the same LightningCLI with each image its own client by default) attacks them through the
attack's target axis, up to ``--targets_per_fit`` targets per fit, batched like restarts and split over the
devices like them (:func:`attack_targets`); each target's restarts are scored and chosen on their own.

Outputs in the run's folder: ``target_NAME/`` per target (``reconstruction.png``, ``reconstruction.pt``,
``metrics.json`` with the threat model), and ``evaluation.csv`` (one row per target), ``evaluation.md`` (mean ± std
of each metric), ``evaluation.png`` (every ground truth above its reconstruction) and ``evaluation.pt`` (the
images). They are rewritten as each fit finishes, so a run stopped half-way keeps the targets done. A target whose
image cannot be read is skipped: its row names the error, and the others are kept.

:func:`evaluate_targets` does the same from Python, with a victim given as a module.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from .attack import GradientInversion
from .client import Client
from .data import VisionData
from .errors import InputError
from .images import denormalize
from .metrics import LPIPSMetric, evaluate, match_to_truth, summarize
from .notices import lightning_notices_silenced
from .report import InversionReport, check_writable, draw_rows
from .targets import attack_victim
from .threat_model import COLUMNS as THREAT_MODEL_COLUMNS

if TYPE_CHECKING:
    from .cli import InversionCLI

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
# evaluation.png shows at most this many targets (8 bands of 8).
GRID_TARGETS = 64
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
            restarts; target t of the evaluation starts from the seeds of a separate run with seed ``seed + t·R``,
            whatever the fits); the results are written as each fit finishes. 1: one fit per target.

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
            # Target t of the evaluation starts where a separate run with seed + t·R starts, whatever the fits.
            first = {**options, "seed": int(options.get("seed", 0)) + start * int(options.get("restarts", 1))}
            attacked = iter(_attack_chunk(data, victim, readable, first, client, settings, metric))
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
    """A readable name for an option: a class's or function's name, also inside a ``functools.partial``, or the
    class of a ``class_path``."""
    class_path = value.get("class_path") if hasattr(value, "get") else None
    if isinstance(class_path, str):
        return class_path.rsplit(".", 1)[-1]
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
    measured = [row for row in evaluation.rows if row["error"] is None]
    if len(evaluation.images) and measured:  # the first GRID_TARGETS targets: a picture, not a wall
        shown = measured[:GRID_TARGETS]
        n = len(evaluation.images) // len(measured) * len(shown)  # each target's B images
        save_pairs(folder / "evaluation.png", evaluation.images[:n], evaluation.truth[:n], rows=shown)
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
    measured = sum(row["error"] is None for row in evaluation.rows)
    if measured > GRID_TARGETS:
        lines.append(f"Note: evaluation.png shows the first {GRID_TARGETS} of the {measured} targets")
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
    if rows is not None:  # the measured targets', each once per image of its client
        measured = [row for row in rows if row["error"] is None]
        rows = [row for row in measured for _ in range(len(images) // max(len(measured), 1))]
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


# --- the command line: the CLI's run over the data's clients -----------------------------------------------------
def attack_targets(
    cli: InversionCLI, data: VisionData, report: InversionReport, ckpt_path: str | None = None
) -> Evaluation | None:
    """Attack each of the data's clients (:meth:`~lightning_inversion.data.VisionData.target_clients`) as a target
    of the CLI's attack, ``--targets_per_fit`` per fit, and write each target's outputs and the table.

    Each fit gets a fresh attack (:meth:`InversionCLI.attack_on`: the same options and the same victim module, which
    also computes every client's update) and a Trainer with the CLI's options (:meth:`InversionCLI.
    trainer_for_targets`); under DDP its (target, restart) slots are split over the processes, and global rank 0
    writes ``target_NAME/`` (the report), then reads them back into the table, so the table is the same whichever
    launcher ran the processes. SIGINT/SIGTERM stop the fit after its current step; the report writes its targets'
    outputs so far (marked interrupted), the targets of finished fits stay in the table, and the process exits with
    128 + the signal's number.

    Returns:
        the evaluation (on global rank 0; ``None`` on the other processes).

    Raises:
        InputError: ``--update`` or ``--ckpt_path`` (an attack on several targets is not continued), or no folder
            to write to.
    """
    from .cli import StopOnSignal, _client_update

    config = cli.config_init[cli.subcommand]
    template: GradientInversion = cli.model
    clients = data.target_clients()
    if config.get("update"):
        raise InputError(
            f"--update is one client's update, but the data deals its images to {len(clients)} clients "
            "(data.images_per_client): attack it with invert.py fit and data.images_per_client unset"
        )
    if ckpt_path is not None:
        raise InputError(
            f"--ckpt_path continues an attack on one target, not a run over {len(clients)} targets (whose "
            "finished targets stay in their folders): start the run again without --ckpt_path"
        )
    folder = report.output_folder(cli.trainer)
    if folder is None:
        raise InputError(
            f"an attack on {len(clients)} targets writes each target's outputs and a table: give "
            "--report.output_dir (or a --trainer.logger)"
        )
    per_fit = int(config["targets_per_fit"])
    description = _describe_cli(cli, data, template)
    metric_note = []
    if report.lpips:
        reason = LPIPSMetric().reason
        metric_note = [reason] if reason else []
    rows: list[dict[str, Any]] = []
    images: list[Tensor] = []
    truths: list[Tensor] = []
    first, rank_zero = True, True
    with StopOnSignal() as stop:
        for start in range(0, len(clients), per_fit):
            chunk, readable, skipped = clients[start : start + per_fit], [], {}
            for position, indices in enumerate(chunk):
                try:
                    readable.append((indices, *data.client_batch(indices)))
                except UNREADABLE as error:  # this target only: the others are still worth their time
                    skipped[position] = _skipped(_joined(indices), error)
                    log.error("target %s skipped: %s", target_name(indices), skipped[position]["error"])
            measured = iter([])
            if readable:
                reuse = first and start == 0 and len(readable) == template.targets
                module = template if reuse else cli.attack_on(len(readable), start)
                device = next(module.victim.parameters()).device
                updates = [
                    _client_update(module.client, module, data, x.to(device), y.to(device))
                    for _, x, y in readable
                ]
                module.set_targets(updates)
                names = [target_name(indices) for indices, _, _ in readable]
                truth = [(denormalize(x, data.mean, data.std).clamp(0, 1), y) for _, x, y in readable]
                report.set_targets(names, truth)
                trainer = cli.trainer_for_targets(first)
                first = False
                trainer.callbacks.append(stop)
                try:
                    trainer.fit(module)  # the attack sees the updates only, not the data
                except SIGTERMException:  # the report has written this fit's targets so far
                    log.error(
                        "interrupted: the targets of the finished fits are in %s", Path(folder).resolve()
                    )
                    raise SystemExit(128 + (stop.signum or signal.SIGTERM)) from None
                rank_zero = trainer.is_global_zero
                if rank_zero:
                    measured = iter(
                        _read_target(folder, indices, y, pixels, len(readable))
                        for (indices, _, y), (pixels, _) in zip(readable, truth, strict=True)
                    )
            if not rank_zero:
                continue
            for position in range(len(chunk)):  # in the order of the targets
                if position in skipped:
                    rows.append(skipped[position])
                    continue
                row, image, pixels = next(measured)
                rows.append(row)
                images.append(image)
                truths.append(pixels)
                log.info(
                    "target %d/%d (%s): PSNR %s dB, SSIM %s",
                    len(rows), len(clients), row["index"], _fixed(row["psnr"], 2), _fixed(row["ssim"], 3),
                )  # fmt: skip
            done = start + len(chunk)
            notes = list(metric_note)
            if done < len(clients):  # what is done so far survives a stop
                notes.append(
                    f"{len(clients) - done} of {len(clients)} targets still to run when this was written"
                )
            evaluation = _collect(rows, images, truths, notes)
            write_evaluation(folder, evaluation, description)
    if not rank_zero:
        return None
    log.info("wrote %s", Path(folder).resolve())
    return evaluation


def target_name(indices: Sequence[int]) -> str:
    """A target's name: the indices of its images in the target split, joined by ``+`` (its folder
    ``target_NAME``)."""
    return "+".join(str(int(i)) for i in indices)


def _read_target(
    folder: Path, indices: list[int], labels: Tensor, truth: Tensor, targets_in_fit: int
) -> tuple[dict[str, Any], Tensor, Tensor]:
    """One target's row, reconstruction (in the ground truth's order) and ground truth, from the files the report
    wrote in ``folder/target_NAME``."""
    where = Path(folder) / f"target_{target_name(indices)}"
    metrics = json.loads((where / "metrics.json").read_text())
    for key, value in (metrics.pop("not_finite", None) or {}).items():
        if key in metrics:  # a top-level number that is not finite (PSNR inf: identical images)
            metrics[key] = float(value)
    image = torch.load(where / "reconstruction.pt", map_location="cpu", weights_only=True)["images"].float()
    if len(image) > 1 and not torch.isnan(image).any():
        image = image[match_to_truth(image, truth)]
    stats = metrics.get("attack", {})
    model = metrics.get("threat_model") or {}
    seconds = stats.get("seconds")
    row = {
        "index": _joined(indices),
        "label": _joined(labels.tolist()),
        "psnr": metrics.get("psnr"),
        "ssim": metrics.get("ssim"),
        "lpips": metrics.get("lpips"),
        "mse": metrics.get("mse"),
        "feature_mse": metrics.get("feature_mse"),
        "label_accuracy": metrics.get("label_accuracy"),
        "seconds": None if seconds is None else seconds / targets_in_fit,  # the fit's time, shared
        "chosen_restart": stats.get("chosen_restart"),
        **{key: model.get(key) for key in THREAT_MODEL_COLUMNS},
        "error": None,
    }
    return row, image, truth


def _fixed(value: float | None, digits: int) -> str:
    """A number with ``digits`` decimals, or ``n/a`` (a failed reconstruction)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _joined(values: Sequence[int]) -> int | str:
    """One index (or label) as itself, several joined by ``+``."""
    return int(values[0]) if len(values) == 1 else "+".join(str(int(v)) for v in values)


def _describe_cli(cli: InversionCLI, data: VisionData, model: GradientInversion) -> str:
    """The line above the table: victim, data, steps, client and the attack options the run changed."""
    config = cli.config[cli.subcommand]
    defaults = cli._parser(cli.subcommand).get_defaults().model
    options = config.model
    victim = options.get("victim_checkpoint")
    victim = f"checkpoint {victim}" if victim else _name(options.get("victim"))
    parts = [f"victim {victim}", f"data {type(data).__name__} {tuple(data.image_shape)}"]
    parts.append(f"{config.trainer.get('max_steps')} steps")
    if config.trainer.get("precision") is not None:
        parts.append(f"precision {config.trainer.precision}")
    parts.append(f"client {model.client.protocol}")
    skip = {
        "victim",
        "victim_checkpoint",
        "num_classes",
        "image_shape",
        "mean",
        "std",
        "num_images",
        "targets",
    }
    for key, value in sorted(vars(options).items()):
        if key not in skip and value != defaults.get(key):
            parts.append(f"{key} {_name(value)}")
    return ", ".join(parts)


def main(args: list[str] | None = None) -> Evaluation | None:
    """Run ``evaluate.py`` (``args=None`` reads ``sys.argv``): ``invert.py fit`` with each chosen image its own
    client unless ``data.images_per_client`` says otherwise, outputs in ``outputs/evaluation`` unless
    ``report.output_dir`` says otherwise, no logger and no checkpoints by default."""
    from .cli import main as cli_main

    if args is None:  # the command line: read as invert.py fit's (and so re-run by Lightning's DDP launcher)
        if sys.argv[1:2] != ["fit"]:
            sys.argv.insert(1, "fit")
        cli = cli_main(None, evaluation=True)
    else:
        cli = cli_main(args if args[:1] == ["fit"] else ["fit", *args], evaluation=True)
    return None if cli is None else cli.evaluation_result
