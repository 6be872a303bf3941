"""The report: the only place ground truth meets the attack. Live metrics during a run, output files at the end."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torchvision.utils import make_grid, save_image

from .attack import GradientInversion, Reconstruction, dummy_images_as_pixels
from .images import normalize
from .metrics import LPIPSMetric, evaluate, match_to_truth, psnr, ssim

log = logging.getLogger(__name__)


def upscale(images: Tensor, min_side: int = 96) -> Tensor:
    """Nearest-neighbour upscaling so tiny images stay visible in a PNG: ``(N, C, H, W)``."""
    factor = max(1, math.ceil(min_side / min(images.shape[-2:])))
    return images if factor == 1 else F.interpolate(images, scale_factor=factor, mode="nearest")


def save_comparison(path: str | os.PathLike, images: Tensor, truth: Tensor | None = None) -> None:
    """Write a PNG: ground truth in the top row (when known), the reconstruction below, image i above image i."""
    rows = [truth, images] if truth is not None else [images]
    grid = torch.cat([upscale(r.float().cpu().clamp(0, 1)) for r in rows])
    save_image(make_grid(grid, nrow=len(images), padding=2, pad_value=1.0), path)


class InversionReport(pl.Callback):
    """Measure the attack against the ground truth (when known) and write its outputs.

    During the run it logs PSNR and SSIM of the currently best restart; at the end it writes, in the output
    folder, ``reconstruction.png`` (ground truth above reconstruction), ``reconstruction.pt`` (the chosen images
    in [0, 1], every restart, the labels and the stats) and ``metrics.json``, and prints a short summary.

    Args:
        output_dir: where to write the files; ``None`` uses the Trainer's log directory (no files without one).
        monitor_every_n_steps: log PSNR/SSIM of the best restart against the ground truth every this many steps
            (0: only at the end).
        lpips: compute LPIPS (AlexNet) at the end, where its weights can be had.
    """

    def __init__(self, output_dir: str | None = None, monitor_every_n_steps: int = 50, lpips: bool = True) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.monitor_every_n_steps = monitor_every_n_steps
        self.lpips = lpips
        self.truth: Tensor | None = None
        self.truth_labels: Tensor | None = None
        self.metrics: dict | None = None
        self.directory: Path | None = None

    def set_ground_truth(self, images: Tensor | None, labels: Tensor | None = None) -> None:
        """The client's private images in [0, 1] ``(B, C, H, W)`` and labels ``(B,)``, for measuring only."""
        self.truth = None if images is None else images.detach().float().cpu()
        self.truth_labels = None if labels is None else labels.detach().cpu()

    def on_train_batch_end(self, trainer, pl_module: GradientInversion, outputs, batch, batch_idx) -> None:
        n = self.monitor_every_n_steps
        if self.truth is None or not n or trainer.global_step % n:
            return
        best = int(torch.nan_to_num(pl_module.last_cost, nan=math.inf).argmin())
        images = dummy_images_as_pixels(pl_module, [best])[0].cpu()
        truth = self.truth
        if len(images) > 1:
            images = images[match_to_truth(images, truth)]
        pl_module.log("train/psnr", psnr(images, truth).mean(), prog_bar=True, rank_zero_only=True)
        pl_module.log("train/ssim", ssim(images, truth).mean(), rank_zero_only=True)

    def output_folder(self, trainer: pl.Trainer) -> Path | None:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir) if trainer.log_dir and trainer.loggers else None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: GradientInversion) -> None:
        if not trainer.is_global_zero:
            return
        result = pl_module.reconstruction
        if result is None:  # no optimisation step ran (max_steps 0, e.g. a closed-form recovery)
            result = pl_module.reconstruction = pl_module.reconstruct_result()
        self.metrics = self.measure(result, pl_module)
        folder = self.output_folder(trainer)
        if folder is not None:
            self.write(folder, result)
        self._summarize(result, folder)

    def measure(self, result: Reconstruction, pl_module: GradientInversion) -> dict:
        """Everything ``metrics.json`` holds: scores, steps and seconds, and metrics against ground truth."""
        metrics: dict = {"attack": dict(result.stats), "labels": result.labels.tolist()}
        if self.truth is not None and not torch.isnan(result.images).any():
            metrics.update(
                evaluate(
                    result.images,
                    self.truth,
                    result.labels,
                    self.truth_labels,
                    victim=pl_module.victim,
                    mean=pl_module.mean,
                    std=pl_module.std,
                    lpips=LPIPSMetric() if self.lpips else None,
                )
            )
        if self.truth is not None and pl_module.analytic_features is not None:
            metrics["analytic_feature_error"] = self._feature_error(pl_module)
        return metrics

    def _feature_error(self, pl_module: GradientInversion) -> float:
        """Max abs error of the closed-form features against the true input of that layer (first image)."""
        name, _ = pl_module.analytic_layer
        seen = []
        layer = pl_module.victim.get_submodule(name)
        handle = layer.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
        device = next(pl_module.victim.parameters()).device
        with torch.no_grad():
            pl_module.victim(normalize(self.truth[:1], pl_module.mean, pl_module.std).to(device))
        handle.remove()
        true = seen[0].flatten().cpu()
        return float((pl_module.analytic_features.flatten().cpu() - true).abs().max())

    def write(self, folder: Path, result: Reconstruction) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "images": result.images,
                "labels": result.labels,
                "restarts": result.restarts,
                "stats": result.stats,
            },
            folder / "reconstruction.pt",
        )
        if not torch.isnan(result.images).any():
            save_comparison(folder / "reconstruction.png", result.images, self.truth)
        (folder / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
        self.directory = folder

    def _summarize(self, result: Reconstruction, folder: Path | None) -> None:
        stats = result.stats
        lines = [f"Reconstructed {tuple(result.images.shape)} in {stats['steps']} steps, {stats['seconds']:.1f} s"]
        if stats["chosen_restart"] is not None:
            lines.append(f"  chosen restart {stats['chosen_restart']} of {len(stats['scores'])}")
        m = self.metrics or {}
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
