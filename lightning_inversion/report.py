"""The report: the only place ground truth meets the attack. Live metrics during a run, output files at the end."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor
from torchvision.utils import make_grid, save_image

from .analytic import find_linear_layers
from .attack import GradientInversion, Reconstruction, dummy_images_as_pixels
from .images import normalize
from .metrics import LPIPSMetric, evaluate, flat_psnr, match_to_truth, psnr, restart_agreement, ssim

log = logging.getLogger(__name__)


class OutputFolderError(OSError):
    """A folder the run must write to cannot be written."""


def check_writable(folder: str | os.PathLike, option: str) -> None:
    """Create ``folder`` if needed and write (and remove) a file in it, so a bad folder fails before any work.

    Permission bits alone do not tell (root ignores them; a read-only mount does not show in them): this writes.

    Raises:
        OutputFolderError: naming the folder and the ``option`` that chose it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputFolderError(f"cannot write to {folder} ({option}): {reason}") from None


def upscale(images: Tensor, min_side: int = 96) -> Tensor:
    """Nearest-neighbour upscaling so tiny images stay visible in a PNG: ``(N, C, H, W)``."""
    factor = max(1, math.ceil(min_side / min(images.shape[-2:])))
    return images if factor == 1 else F.interpolate(images, scale_factor=factor, mode="nearest")


def comparison_grid(images: Tensor, truth: Tensor | None = None) -> Tensor:
    """One ``(3, H', W')`` picture: ground truth in the top row (when known), the reconstruction below."""
    rows = [truth, images] if truth is not None else [images]
    grid = torch.cat([upscale(r.float().cpu().clamp(0, 1)) for r in rows])
    return make_grid(grid, nrow=len(images), padding=2, pad_value=1.0)


def save_comparison(
    path: str | os.PathLike,
    images: Tensor,
    truth: Tensor | None = None,
    restarts: Tensor | None = None,
    scores: list[float] | None = None,
    chosen: int | None = None,
) -> list[str]:
    """Write a PNG with titled rows: ground truth (when known), the reconstruction, and optionally every restart.

    Each reconstruction is put under the ground truth it was matched to (Hungarian assignment, as for the
    metrics) with its PSNR and SSIM below it. Tiny images are enlarged without blurring (nearest neighbour).

    Args:
        path: the PNG to write.
        images: the chosen reconstruction in [0, 1], ``(B, C, H, W)``.
        truth: the ground truth in [0, 1], ``(B, C, H, W)``, or ``None``.
        restarts: every restart in [0, 1], ``(R, B, C, H, W)``, to show one row each; ``None``: not shown.
        scores: each restart's selection score, shown in its row's title.
        chosen: the restart that was chosen, marked in its row's title.

    Returns:
        the row titles, top to bottom.
    """
    rows: list[tuple[str, Tensor, list[str] | None]] = []
    if truth is not None:
        rows.append(("ground truth", truth, None))
    rows.append(("reconstruction", *_matched_with_captions(images, truth)))
    for r, restart in enumerate(restarts if restarts is not None else []):
        title = f"restart {r}" + (" (chosen)" if r == chosen else "")
        title += f"\nscore {scores[r]:.3g}" if scores is not None else ""
        rows.append((title, *_matched_with_captions(restart, truth)))
    draw_rows(path, rows)
    return [title for title, _, _ in rows]


def _matched_with_captions(images: Tensor, truth: Tensor | None) -> tuple[Tensor, list[str] | None]:
    """The images in the ground truth's order and their ``PSNR``/``SSIM`` captions (none without ground truth)."""
    images = images.float().cpu()
    if truth is None or torch.isnan(images).any():
        return torch.nan_to_num(images, nan=0.0), None
    truth = truth.float().cpu()
    if len(images) > 1:
        images = images[match_to_truth(images, truth)]
    captions = [
        f"PSNR {p:.1f} dB\nSSIM {q:.2f}"
        for p, q in zip(psnr(images, truth).tolist(), ssim(images, truth).tolist(), strict=True)
    ]
    return images, captions


def draw_rows(
    path: str | os.PathLike,
    rows: list[tuple[str, Tensor, list[str] | None]],
    per_row: int = 8,
    cell_inches: float = 1.4,
) -> None:
    """Write a PNG of image rows, each with its title on the left and an optional caption under each image.

    Args:
        path: the PNG to write.
        rows: ``(title, images (N, C, H, W) in [0, 1], captions or None)``; rows longer than ``per_row`` wrap,
            and the rows repeat in that order for each band of ``per_row`` images.
        per_row: images per line.
        cell_inches: the side of one image in the figure (100 pixels per inch).
    """
    from matplotlib.figure import Figure  # no pyplot: renders with Agg and leaves the user's backend alone

    count = max(len(images) for _, images, _ in rows)
    columns = min(per_row, count)
    bands = math.ceil(count / columns)
    captioned = any(captions for _, _, captions in rows)
    cell_height = cell_inches + (0.4 if captioned else 0.1)
    lines = len(rows) * bands
    fig = Figure(figsize=(1.2 + columns * cell_inches, 0.2 + lines * cell_height), layout="constrained")
    axes = fig.subplots(lines, columns, squeeze=False)
    for band in range(bands):
        for k, (title, images, captions) in enumerate(rows):
            line = band * len(rows) + k
            for column in range(columns):
                ax = axes[line, column]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                i = band * columns + column
                if column == 0:
                    ax.set_ylabel(title, fontsize=10)
                if i >= len(images):
                    continue
                image = images[i].float().clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, C)
                gray = image.shape[-1] == 1
                ax.imshow(
                    image[..., 0] if gray else image,
                    cmap="gray" if gray else None,
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                )
                if captions:
                    ax.set_xlabel(captions[i], fontsize=8)
    fig.savefig(path, dpi=100)


def plot_progress(path: str | os.PathLike, history: dict[str, list]) -> None:
    """Write a PNG of the best restart's matching cost (and PSNR, when known) over the optimiser's steps.

    Args:
        path: the PNG to write.
        history: ``step`` and ``matching_cost`` lists of equal length; ``psnr_step`` and ``psnr`` likewise, all
            steps counted as the Trainer's optimiser steps.
    """
    from matplotlib.figure import Figure  # no pyplot: renders with Agg and leaves the user's backend alone

    panels = 2 if history["psnr"] else 1
    fig = Figure(figsize=(5 * panels, 3.5), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False, sharex=True)[0]
    costs = [
        (s, c) for s, c in zip(history["step"], history["matching_cost"], strict=True) if math.isfinite(c)
    ]
    if costs:
        axes[0].plot(*zip(*costs, strict=True), lw=1)
        if all(c > 0 for _, c in costs):
            axes[0].set_yscale("log")
    axes[0].set(
        xlabel="optimiser step", ylabel="gradient-matching cost", title="best restart's matching cost"
    )
    if panels == 2:
        axes[1].plot(history["psnr_step"], history["psnr"], marker=".", lw=1)
        axes[1].set(xlabel="optimiser step", ylabel="PSNR (dB)", title="PSNR against the ground truth")
    steps = [*history["step"], *history["psnr_step"]]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlim(0, max(steps, default=1) or 1)
    fig.savefig(path, dpi=100)


class InversionReport(pl.Callback):
    """Measure the attack against the ground truth (when known) and write its outputs.

    During the run it logs PSNR and SSIM of the currently best restart, keeps the history of the best restart's
    matching cost (and PSNR), and every ``snapshot_every_n_steps`` shows the current best images: as an image of
    a TensorBoard logger, or else as ``snapshots/step_NNNNNN.png`` in the output folder. At the end it writes, in
    the output folder, ``reconstruction.png`` (ground truth above reconstruction), ``progress.png`` (cost and PSNR
    over the steps), ``reconstruction.pt`` (the chosen images in [0, 1], every restart, the labels and the stats)
    and ``metrics.json``, and prints a short summary. Only the global rank 0 measures and writes; under DDP its
    live numbers cover the restarts that rank optimises.

    A run stopped by SIGINT or SIGTERM (a ``SIGTERMException`` at the end of a step, raised by the CLI's
    ``StopOnSignal`` or by Lightning's own SIGTERM handling) keeps its work: ``last.ckpt`` is saved in the folder of every ``ModelCheckpoint`` and the
    outputs of the best restarts so far are written, with ``"interrupted": true`` and the step reached in
    ``metrics.json``. Any other exception can stop a run in the middle of a step and writes nothing.

    Args:
        output_dir: where to write the files; ``None`` uses the Trainer's log directory (no files without one).
        monitor_every_n_steps: log PSNR/SSIM of the best restart against the ground truth every this many steps
            (0: only at the end).
        lpips: compute LPIPS (AlexNet) at the end, where its weights can be had.
        snapshot_every_n_steps: show the current best images every this many steps (0: never).
        show_restarts: add a row per restart (with its selection score) to ``reconstruction.png``.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        monitor_every_n_steps: int = 50,
        lpips: bool = True,
        snapshot_every_n_steps: int = 500,
        show_restarts: bool = False,
    ) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.monitor_every_n_steps = monitor_every_n_steps
        self.lpips = lpips
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.show_restarts = show_restarts
        self.truth: Tensor | None = None
        self.truth_labels: Tensor | None = None
        self.metrics: dict | None = None
        self.directory: Path | None = None
        self.history: dict[str, list] = _empty_history()
        self._pending: list[tuple[int, Tensor]] = []  # (step, best cost) still on the device
        self._folder: Path | None = None
        self._folder_known = False
        # An attack on several targets (set_targets): each one's name and ground truth (pixels, labels).
        self.target_names: list[str] | None = None
        self.target_truths: list[tuple[Tensor, Tensor]] = []
        self.target_metrics: list[dict] = []

    def set_ground_truth(self, images: Tensor | None, labels: Tensor | None = None) -> None:
        """The client's private images in [0, 1] ``(B, C, H, W)`` and labels ``(B,)``, for measuring only."""
        self.truth = None if images is None else images.detach().float().cpu()
        self.truth_labels = None if labels is None else labels.detach().cpu()

    def set_targets(self, names: list[str], truths: list[tuple[Tensor, Tensor]]) -> None:
        """The targets of an attack on several (``targets`` T > 1, or an evaluation), for measuring only.

        Each target's outputs go to ``target_NAME/`` in the output folder; the live PSNR is the mean over targets.

        Args:
            names: each target's name (the indices of its images in the target split, joined by ``+``).
            truths: each target's private images in [0, 1] ``(B, C, H, W)`` and labels ``(B,)``.
        """
        self.target_names = list(names)
        self.target_truths = [(x.detach().float().cpu(), y.detach().cpu()) for x, y in truths]
        self.truth = torch.cat([x for x, _ in self.target_truths])  # (T·B, C, H, W): the live view's
        self.truth_labels = torch.cat([y for _, y in self.target_truths])
        self.target_metrics = []

    def setup(self, trainer: pl.Trainer, pl_module: GradientInversion, stage: str) -> None:
        # trainer.log_dir is a collective under DDP: every process asks once, here, never rank 0 alone later.
        self._folder = self.output_folder(trainer)
        self._folder_known = True
        # A fresh history; a resumed run's comes from the checkpoint (load_state_dict runs after setup).
        self.history, self._pending = _empty_history(), []

    def on_train_batch_end(self, trainer, pl_module: GradientInversion, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        # Kept on the device (no sync per step) and fetched in one transfer at snapshots, checkpoints and the end.
        self._pending.append((step, torch.nan_to_num(pl_module.last_cost, nan=math.inf).min()))
        n, every = self.monitor_every_n_steps, self.snapshot_every_n_steps
        monitor = self.truth is not None and n and step % n == 0
        snapshot = every and step % every == 0 and self._snapshot_destination(trainer) is not None
        if not (monitor or snapshot):
            return
        images = self._best_images(pl_module)
        if monitor:
            value = psnr(images, self.truth).mean()
            pl_module.log("train/psnr", value, prog_bar=True, rank_zero_only=True)
            pl_module.log("train/ssim", ssim(images, self.truth).mean(), rank_zero_only=True)
            self.history["psnr_step"].append(step)
            self.history["psnr"].append(float(value))
        if snapshot:
            self._flush()
            self._snapshot(trainer, images, step)

    def _best_images(self, pl_module: GradientInversion) -> Tensor:
        """The images of the restart with the lowest latest cost, in the ground truth's order: ``(B, C, H, W)``;
        of several targets each one's best restart (among this process's), ``(T·B, C, H, W)``."""
        costs = torch.nan_to_num(pl_module.last_cost, nan=math.inf)
        if self.target_names is None:
            best = int(costs.argmin())
            images = dummy_images_as_pixels(pl_module, [best])[0].cpu()
            if self.truth is not None and len(images) > 1:
                images = images[match_to_truth(images, self.truth)]
            return images
        r = pl_module.restarts
        best = (costs.view(-1, r).argmin(1).cpu() + torch.arange(len(costs) // r) * r).tolist()
        images = dummy_images_as_pixels(pl_module, best).cpu()  # (T, B, C, H, W)
        ordered = [
            x[match_to_truth(x, truth)] if len(x) > 1 else x
            for x, (truth, _) in zip(images, self.target_truths, strict=True)
        ]
        return torch.cat(ordered)

    def _snapshot_destination(self, trainer: pl.Trainer) -> TensorBoardLogger | Path | None:
        """A TensorBoard logger, else the ``snapshots`` folder of the outputs, else nowhere (``None``)."""
        board = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if board is not None:
            return board
        return self._folder / "snapshots" if self._folder is not None else None

    def _snapshot(self, trainer: pl.Trainer, images: Tensor, step: int) -> None:
        grid = comparison_grid(images, self.truth)
        destination = self._snapshot_destination(trainer)
        if isinstance(destination, TensorBoardLogger):
            destination.experiment.add_image("reconstruction", grid, step)
        elif destination is not None:
            destination.mkdir(parents=True, exist_ok=True)
            save_image(grid, destination / f"step_{step:06d}.png")

    def _flush(self) -> None:
        if self._pending:
            costs = torch.stack([c for _, c in self._pending]).float().cpu().tolist()
            self.history["step"].extend(s for s, _ in self._pending)
            self.history["matching_cost"].extend(costs)
            self._pending = []

    def state_dict(self) -> dict:
        """The history so far (plain lists), so a resumed run's ``progress.png`` covers all its steps."""
        self._flush()
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        history = state_dict.get("history")
        if history is not None:
            self.history = {k: list(history.get(k, [])) for k in _empty_history()}

    def output_folder(self, trainer: pl.Trainer) -> Path | None:
        """The folder for the outputs. Calls ``trainer.log_dir``, a collective under DDP: call it on every rank."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir) if trainer.log_dir and trainer.loggers else None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: GradientInversion) -> None:
        self._finish(trainer, pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: GradientInversion, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):  # a crash or a second Ctrl+C may stop mid-step
            return
        # Between two steps, so the state is that of a step's end: the checkpoint first (nothing below touches
        # the images or the random generators, but the result is built after it all the same).
        checkpoints = save_last_checkpoint(trainer)
        pl_module.finish(sync=True)  # the time so far and the result of the best restarts so far
        self._finish(trainer, pl_module, interrupted=True, checkpoints=checkpoints)

    def _finish(
        self,
        trainer: pl.Trainer,
        pl_module: GradientInversion,
        interrupted: bool = False,
        checkpoints: list[Path] | None = None,
    ) -> None:
        folder = self._folder if self._folder_known else self.output_folder(trainer)
        self._folder_known = False
        if not trainer.is_global_zero:
            return
        if self.target_names is not None:
            self._finish_targets(trainer, pl_module, folder, interrupted, checkpoints)
            return
        result = pl_module.reconstruction
        if result is None:  # no optimisation step ran (max_steps 0, e.g. a closed-form recovery)
            result = pl_module.reconstruction = pl_module.reconstruct_result()
        self._flush()
        self.metrics = self.measure(result, pl_module)
        self.metrics["interrupted"] = interrupted
        if interrupted:
            self.metrics["interrupted_at_step"] = trainer.global_step
            self.metrics["max_steps"] = trainer.max_steps
            self.metrics["checkpoints"] = [str(path) for path in checkpoints or []]
        if "psnr" in self.metrics and trainer.global_step not in self.history["psnr_step"]:
            self.history["psnr_step"].append(trainer.global_step)  # optimiser steps, as the cost's
            self.history["psnr"].append(self.metrics["psnr"])
        if folder is not None:
            self.write(folder, result)
        self._summarize(result, folder)
        if interrupted:
            where = ", ".join(str(path) for path in checkpoints or []) or "nowhere (checkpointing is off)"
            rank_zero_info(
                f"Interrupted at step {trainer.global_step} of {trainer.max_steps}: checkpoint in {where}; "
                "continue with --ckpt_path last"
            )

    def _finish_targets(
        self,
        trainer: pl.Trainer,
        pl_module: GradientInversion,
        folder: Path | None,
        interrupted: bool,
        checkpoints: list[Path] | None,
    ) -> None:
        """The outputs of an attack on several targets: ``target_NAME/`` with each one's files."""
        results = pl_module.reconstructions
        if results is None:
            results = pl_module.reconstructions = pl_module.reconstruct_results()
        self._flush()
        self.target_metrics = []
        updates = pl_module.updates or [pl_module.update] * len(results)
        metric = LPIPSMetric() if self.lpips else None  # loaded once for all the targets
        for name, (truth, labels), update, result in zip(
            self.target_names, self.target_truths, updates, results, strict=True
        ):
            metrics = self.measure(result, pl_module, truth, labels, update, metric)
            metrics["target"] = {"name": name, "targets_in_fit": len(results)}
            metrics["interrupted"] = interrupted
            if interrupted:
                metrics["interrupted_at_step"] = trainer.global_step
                metrics["max_steps"] = trainer.max_steps
                metrics["checkpoints"] = [str(path) for path in checkpoints or []]
            self.target_metrics.append(metrics)
            if folder is not None:
                self.write(folder / f"target_{name}", result, truth, metrics, progress=False)
        self.metrics, self.directory = None, folder
        psnrs = [m["psnr"] for m in self.target_metrics if m.get("psnr") is not None]
        count = f"{len(results)} target{'s' if len(results) > 1 else ''}"
        line = f"Reconstructed {count} of {tuple(results[0].images.shape)} in {results[0].steps} steps, "
        line += f"{results[0].seconds:.1f} s"
        if psnrs:
            line += f"; mean PSNR {sum(psnrs) / len(psnrs):.2f} dB"
        if folder is not None:
            line += f"; outputs in {folder}/target_*"
        rank_zero_info(line)

    def measure(
        self,
        result: Reconstruction,
        pl_module: GradientInversion,
        truth: Tensor | None = None,
        truth_labels: Tensor | None = None,
        update=None,
        lpips_metric: LPIPSMetric | None = None,
    ) -> dict:
        """Everything ``metrics.json`` holds: scores, steps and seconds, and metrics against ground truth.

        ``truth``, ``truth_labels``, ``update``: one target's of several (default: the report's, the module's);
        ``lpips_metric``: LPIPS already loaded (default: loaded here when ``lpips``).
        """
        if truth is None:
            truth, truth_labels = self.truth, self.truth_labels
        stats = result.stats()
        if len(result.scores) > 1:  # needs no ground truth: does the update pin the images down?
            agreement = restart_agreement(
                result.restarts, result.images, result.scores, result.chosen_restart
            )
            stats["restart_agreement_psnr"] = agreement
            # What any image of the chosen one's mean colours scores against it: agreement above it is detail.
            stats["restart_agreement_flat_psnr"] = (
                None if agreement is None else float(flat_psnr(result.images).mean())
            )
        # What the attacker assumed comes first: numbers are comparable only under the same threat model.
        metrics: dict = {
            "threat_model": stats.pop("threat_model"),
            "attack": stats,
            "labels": result.labels.tolist(),
        }
        update = update if update is not None else getattr(pl_module, "update", None)
        if update is not None and update.meta.get("defenses"):  # the client's defenses and the ε they spend
            metrics["defenses"] = list(update.meta["defenses"])
            if update.meta.get("privacy") is not None:
                metrics["privacy"] = dict(update.meta["privacy"])
        if truth is not None and not torch.isnan(result.images).any():
            metrics.update(
                evaluate(
                    result.images,
                    truth,
                    result.labels,
                    truth_labels,
                    victim=pl_module.victim,
                    mean=pl_module.mean,
                    std=pl_module.std,
                    lpips=lpips_metric or (LPIPSMetric() if self.lpips else None),
                )
            )
        if truth is not None and self.target_names is None and pl_module.analytic_features is not None:
            metrics["analytic_feature_error"] = self._feature_error(pl_module)
        return metrics

    def _feature_error(self, pl_module: GradientInversion) -> float:
        """Max abs error of the closed-form features against the true input of that layer (first image)."""
        name = find_linear_layers(pl_module.victim)[0][0]
        seen = []
        layer = pl_module.victim.get_submodule(name)
        handle = layer.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
        device = next(pl_module.victim.parameters()).device
        with torch.no_grad():
            pl_module.victim(normalize(self.truth[:1], pl_module.mean, pl_module.std).to(device))
        handle.remove()
        true = seen[0].flatten().cpu()
        return float((pl_module.analytic_features.flatten().cpu() - true).abs().max())

    def write(
        self,
        folder: Path,
        result: Reconstruction,
        truth: Tensor | None = None,
        metrics: dict | None = None,
        progress: bool = True,
    ) -> None:
        """Write the outputs of one target (``truth``, ``metrics``: one of several; default: the run's)."""
        truth = self.truth if truth is None else truth
        metrics = self.metrics if metrics is None else metrics
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "images": result.images,
                "labels": result.labels,
                "restarts": result.restarts,
                "stats": result.stats(),
            },
            folder / "reconstruction.pt",
        )
        if not torch.isnan(result.images).any():
            restarts = result.restarts if self.show_restarts else None
            save_comparison(
                folder / "reconstruction.png",
                result.images,
                truth,
                restarts,
                result.scores,
                result.chosen_restart,
            )
        if progress and self.history["step"]:  # no plot of a run without optimisation (max_steps 0)
            plot_progress(folder / "progress.png", self.history)
        (folder / "metrics.json").write_text(metrics_json(metrics))
        self.directory = folder

    def _summarize(self, result: Reconstruction, folder: Path | None) -> None:
        lines = [
            f"Reconstructed {tuple(result.images.shape)} in {result.steps} steps, {result.seconds:.1f} s"
        ]
        if result.chosen_restart is not None:
            lines.append(f"  chosen restart {result.chosen_restart} of {len(result.scores)}")
        m = self.metrics or {}
        attack = m.get("attack", {})
        agreement, flat = attack.get("restart_agreement_psnr"), attack.get("restart_agreement_flat_psnr")
        if agreement is not None and flat is not None:
            lines.append(
                f"  the other restarts against the chosen one: {agreement:.1f} dB PSNR, {agreement - flat:+.1f} dB "
                "over a flat image of its mean colours (near 0 or below: the restarts share their colours and no "
                "detail, so the update does not single this reconstruction out)"
            )
        if "psnr" in m:
            parts = [f"PSNR {m['psnr']:.2f} dB", f"SSIM {m['ssim']:.3f}"]
            if m.get("lpips") is not None:
                parts.append(f"LPIPS {m['lpips']:.3f}")
            if "label_accuracy" in m:
                parts.append(f"label accuracy {m['label_accuracy']:.2f}")
            lines.append("  " + ", ".join(parts))
        if folder is not None:
            lines.append(f"  outputs in {folder}")
        rank_zero_info("\n".join(lines))


def save_last_checkpoint(trainer: pl.Trainer) -> list[Path]:
    """Save the run as it stands as ``last.ckpt`` in the folder of every ``ModelCheckpoint`` (call on every rank).

    Returns:
        the files written (none without a ``ModelCheckpoint`` whose folder is known).
    """
    paths: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            if path not in paths:
                trainer.save_checkpoint(path, weights_only=False)  # the whole run, not the weights alone
                paths.append(path)
    return paths


def metrics_json(metrics: dict | None) -> str:
    """``metrics`` as strict JSON: a NaN or infinite number is written as ``null`` and listed, with its value, under
    ``"not_finite"`` (e.g. a restart that diverged or never ran scores ``inf``; identical images have PSNR ``inf``)."""
    not_finite: dict[str, str] = {}

    def clean(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            not_finite[where] = str(value)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(metrics, "")
    if not_finite and isinstance(cleaned, dict):
        cleaned["not_finite"] = not_finite
    return json.dumps(cleaned, indent=2, allow_nan=False)


def _empty_history() -> dict[str, list]:
    return {"step": [], "matching_cost": [], "psnr_step": [], "psnr": []}
